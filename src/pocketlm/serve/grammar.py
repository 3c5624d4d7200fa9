"""Constrained decoding: JSON Schema, JSON mode, regular expressions and Lark/EBNF grammars, via llguidance.

The engine is `llguidance` (Microsoft/guidance-ai; Rust, one 3 MB abi3 wheel, no Python dependencies). It
compiles a JSON schema (or a regex, or a Lark grammar) into a lexer + Earley parser over bytes and computes the
set of allowed token ids for the next step from a token trie, in tens of microseconds per token. It replaced a
hand-written character automaton here that walked the token trie in Python (milliseconds per uncached state,
and only seven schema keywords); bench/bench_grammar.py compares the two. xgrammar was rejected because it
pulls in triton (286 MB) and apache-tvm-ffi; outlines-core has no `$ref` recursion and compiles a whole-schema
regex DFA up front, which is slow for nested schemas.

Coverage (llguidance's JSON Schema support): `$ref`/`$defs`/`definitions` including recursion, anyOf/oneOf
(oneOf treated as anyOf, as vLLM does)/allOf (merged), `type` lists, enum/const (any JSON value), numeric
minimum/maximum/exclusive*/multipleOf for integers, string minLength/maxLength/pattern/format (date, time,
date-time, duration, email, hostname, ipv4, ipv6, uuid, uri, ...), array minItems/maxItems/prefixItems/items,
object properties/required/additionalProperties (boolean or schema)/patternProperties, and the annotations
(title, description, default, examples, ...) accepted and ignored. A keyword that llguidance knows but cannot
enforce, a dangling `$ref` or a malformed value raises SchemaError (the server answers 400): a schema is never
silently weakened.

Rules:
- Whitespace: none inside the JSON (compact separators "," and ":"), as vLLM and Outlines default to. A weak
  model therefore cannot stall in runs of blanks between tokens of the structure.
- Objects with `properties` and no `additionalProperties` are closed, and unbounded integers are kept in
  I-JSON's safe range [-(2**53-1), 2**53-1] (`close_objects`), so a weak model cannot ramble in extra keys or
  endless digits. Strings and fractions are bounded only by the schema and by max_tokens.
- Object properties are generated in schema order (llguidance's rule for `properties`), required or not.
- Control tokens are never allowed except the request's stop tokens, and those only once the value is complete;
  after the value is complete only stop tokens are allowed. A reply cut by max_tokens can still end mid-JSON
  (finish_reason "length"), as in OpenAI.
- `json_object` means "a JSON object" (OpenAI's json mode), i.e. the schema {"type": "object"}.

The small API used by the tests and by callers that check text (not tokens): `compile_schema(schema)` -> a
grammar string, `initial_state(grammar)`, `feed_text(state, text)` (None when rejected) and `can_end(state)`,
evaluated by a matcher over a 256-byte vocabulary.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import numpy as np

from pocketlm.errors import PocketLMError

# Compact JSON, no free whitespace. Keys are emitted in schema order.
JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": r"[ ]?", "item_separator": ",",
                "key_separator": ":", "json_allow_general_unicode_escapes": True}
MAX_GRAMMAR_CACHE = 256


class SchemaError(PocketLMError, ValueError):
    """A JSON schema, regex or grammar is malformed or uses a keyword the constrained decoder cannot enforce."""


# ---- compiling ------------------------------------------------------------------------------------------------

_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def _validated(grammar: str, what: str) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise SchemaError(f"{what}: {messages[0] if messages else 'invalid'}")
    return grammar


def _cached(key: tuple, build) -> str:
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    grammar = build()
    with _cache_lock:
        _cache[key] = grammar
        if len(_cache) > MAX_GRAMMAR_CACHE:
            _cache.popitem(last=False)
    return grammar


SAFE_INTEGER = 2**53 - 1  # I-JSON (RFC 7493) interoperable integer range
# Formats whose strings cannot end at an arbitrary point get a length bound, so closing mode (JsonConstraint) can
# always finish them: an email needs "@" and a domain, which a rambling model may never write.
_FORMAT_MAX_LENGTH = {"email": 64, "idn-email": 64}
_NUMERIC_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "additionalItems")


def close_objects(schema, in_all_of: bool = False):
    """A copy of `schema` where every object with `properties` and no `additionalProperties` is closed.

    Integers without bounds get I-JSON's [-(2**53-1), 2**53-1], so a digit run ends, and emails without maxLength
    get 64 characters.
    JSON Schema's default admits any extra key; a weak model then invents keys forever. OpenAI's strict mode
    requires closed objects, and what Pydantic/zod emit never relies on extra keys, so closed is the default
    here (write `"additionalProperties": true` to allow extras). Members of `allOf` are left open, since their
    properties are merged.
    """
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: close_objects(sub) for name, sub in v.items()}
        elif k in _SUBSCHEMA_LISTS and isinstance(v, list):
            out[k] = [close_objects(sub) for sub in v]
        elif k == "allOf" and isinstance(v, list):
            out[k] = [close_objects(sub, in_all_of=True) for sub in v]
        elif k == "uniqueItems" and v is False:
            continue  # the default; llguidance refuses the keyword even when it asks nothing
        elif k in _SUBSCHEMA_ONE:
            out[k] = close_objects(v)
        else:
            out[k] = v
    if out.get("format") in _FORMAT_MAX_LENGTH and "maxLength" not in out:
        out["maxLength"] = _FORMAT_MAX_LENGTH[out["format"]]
    t = out.get("type")
    if (t == "integer" or isinstance(t, list) and "integer" in t) and not _NUMERIC_BOUNDS & set(out):
        out["minimum"], out["maximum"] = -SAFE_INTEGER, SAFE_INTEGER  # at most 16 digits, no endless digit runs
    if ("properties" in out and "additionalProperties" not in out and "patternProperties" not in out
            and not in_all_of and "allOf" not in out):
        out["additionalProperties"] = False
    return out


def compile_schema(schema) -> str:
    """A JSON schema (dict or True) -> a validated llguidance grammar; SchemaError names the problem."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise SchemaError(f"schema must be an object, got {type(schema).__name__}")
    try:
        text = json.dumps(close_objects(schema), sort_keys=False)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"schema is not JSON: {e}") from None

    def build():
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise SchemaError(f"schema: {e}") from None
        return _validated(grammar, "schema")

    return _cached(("json", text), build)


def check_schema(schema) -> None:
    """Raise SchemaError naming the first unsupported keyword or malformed value."""
    compile_schema(schema)


def compile_regex(regex) -> str:
    """A regular expression (Rust regex syntax, whole-output match) -> a validated grammar."""
    if not isinstance(regex, str) or not regex:
        raise SchemaError(f"regex must be a non-empty string, got {regex!r:.60}")
    return _cached(("regex", regex), lambda: _validated(llguidance.LLMatcher.grammar_from_regex(regex), "regex"))


def compile_grammar(grammar) -> str:
    """A Lark grammar (llguidance's dialect: `start: ...`, /regex/ terminals, %json {...}) or a GBNF (llama.cpp
    EBNF, recognised by `::=`) -> a validated grammar."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise SchemaError(f"grammar must be a non-empty string, got {grammar!r:.60}")

    def build():
        lark = grammar
        if "::=" in grammar:
            from llguidance.gbnf_to_lark import gbnf_to_lark
            try:
                lark = gbnf_to_lark(grammar)
            except Exception as e:  # the converter raises plain exceptions on malformed GBNF
                raise SchemaError(f"grammar: {e}") from None
        return _validated(llguidance.LLMatcher.grammar_from_lark(lark), "grammar")

    return _cached(("lark", grammar), build)


def grammar_for(response_format: dict) -> str:
    """The grammar of a validated `response_format` (json_object, json_schema, regex or grammar)."""
    kind = response_format["type"]
    if kind == "json_object":
        return compile_schema({"type": "object"})
    if kind == "json_schema":
        return compile_schema(response_format["schema"])
    if kind == "regex":
        return compile_regex(response_format["regex"])
    if kind == "grammar":
        return compile_grammar(response_format["grammar"])
    if kind == "lark":  # an already compiled grammar (tool calls, tools.py)
        return response_format["grammar"]
    raise SchemaError(f"response_format type {kind!r} has no grammar")


# ---- tokens ---------------------------------------------------------------------------------------------------


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte table (the inverse of `bytes_to_unicode` in the GPT-2 encoder)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each id stands for (padded to the embedding size); control tokens as b"\\xff" + their text,
    llguidance's marker for tokens that are never produced by text."""
    specials = tokenizer.special_ids
    n = max(getattr(tokenizer, "padded_vocab_size", 0) or 0, len(tokenizer))
    byte_level = type(tokenizer).__name__ == "ByteLevelBPETokenizer"
    decoder = _gpt2_byte_decoder() if byte_level else None
    out: list[bytes] = []
    for i in range(n):
        if i >= len(tokenizer):
            out.append(b"")  # padding rows of the embedding: never allowed
            continue
        piece = tokenizer.id_to_token(i)
        if i in specials or piece is None:
            out.append(b"\xff" + (piece or f"<special{i}>").encode("utf-8"))
        elif decoder is not None:
            try:
                raw = bytes(decoder[c] for c in piece)
                out.append(b"" if raw[:1] == b"\xff" else raw)  # 0xFF never occurs in UTF-8; it marks specials
            except KeyError:  # an added, non-special token written as plain text
                out.append(piece.encode("utf-8"))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            b = int(piece[3:5], 16)
            out.append(bytes([b]) if b < 0xF8 else b"")  # 0xF8..0xFF never occur in UTF-8; 0xFF marks specials
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _Wrapped:
    """The duck-typed tokenizer llguidance.TokenizerWrapper expects."""

    def __init__(self, tokenizer, tokens: list[bytes]):
        self.tokens = tokens
        eos = tokenizer.eos_id
        self.eos_token_id = eos if eos is not None else len(tokens) - 1
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(i for i in tokenizer.special_ids if i < len(tokens))
        self._tok = tokenizer

        # SentencePiece tokenizers prepend "▁" to every text; llguidance needs the tokens of the bare bytes, so
        # encode "\n" + text and drop the tokens of "\n" (llama.cpp's trick).
        self._sp_prefix = [] if type(tokenizer).__name__ == "ByteLevelBPETokenizer" else tokenizer.encode("\n")

    def __call__(self, s) -> list[int]:
        text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
        if not self._sp_prefix:
            return self._tok.encode(text)
        ids = self._tok.encode("\n" + text)
        n = len(self._sp_prefix)
        return ids[n:] if ids[:n] == self._sp_prefix else ids


class TokenTable:
    """A tokenizer's token bytes and its llguidance tokenizer (built once per tokenizer; ~0.3 s for 32k ids)."""

    def __init__(self, tokenizer):
        self.tokens = token_bytes(tokenizer)
        # texts: the decoded text of each plain token (None for control tokens and partial UTF-8).
        self.texts: list[str | None] = []
        for b in self.tokens:
            try:
                self.texts.append(None if not b or b[0] == 0xFF else b.decode("utf-8"))
            except UnicodeDecodeError:
                self.texts.append(None)
        self.n_vocab = len(self.tokens)
        # What the constraint prefers when the budget runs out (JsonConstraint, closing mode): tokens that end a
        # string ('"' then only ']', '}', ','), tokens that close containers (only ']' and '}', maybe after a
        # space), and plain letters that no JSON literal starts with (allowed = we are inside a string).
        plain = [bool(b) and b[0] != 0xFF for b in self.tokens]
        self.quote_close = np.array([p and b[:1] == b'"' and not b[1:].strip(b"]},") for p, b in
                                     zip(plain, self.tokens)], dtype=bool)
        self.closers = np.array([p and bool(b.strip(b" ")) and not b.lstrip(b" ").strip(b"]}") for p, b in
                                 zip(plain, self.tokens)], dtype=bool)
        self.letters = [i for i, b in enumerate(self.tokens) if b in (b"k", b"q", b"x", b"z")]
        self.punct = np.array([p and len(b) == 1 and 33 <= b[0] < 127 and not chr(b[0]).isalnum() for p, b in
                               zip(plain, self.tokens)], dtype=bool)
        self.no_digits = np.array([p and not any(48 <= c <= 57 for c in b) for p, b in zip(plain, self.tokens)],
                                  dtype=bool)
        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(tokenizer, self.tokens)))


_TABLES: dict[int, TokenTable] = {}
_tables_lock = threading.Lock()


def token_table(tokenizer) -> TokenTable:
    with _tables_lock:
        table = _TABLES.get(id(tokenizer))
        if table is None or table.n_vocab < len(tokenizer):
            table = _TABLES[id(tokenizer)] = TokenTable(tokenizer)
        return table


# ---- per-sequence constraint ----------------------------------------------------------------------------------


def closing_reserve(budget: int) -> int:
    """Tokens kept for closing the structure: a third of the budget, at least 8 and at most 128."""
    return max(8, min(128, budget // 3))


class JsonConstraint:
    """Per-sequence constraint: which ids may come next, and advancing by the chosen id.

    `spec` is a JSON schema (dict) or a grammar string from compile_schema/compile_regex/compile_grammar/
    grammar_for. The name is historical: any grammar works.

    `budget` (the request's max_tokens) turns on closing mode for the last `closing_reserve(budget)` tokens: inside
    a free string only tokens that end it are allowed (when the schema lets it end), elsewhere only tokens that
    close arrays and objects (when allowed), and once the output is complete only the stop tokens. A weak model
    that rambles inside a free string, key or array is thus steered to finish a valid value within the budget
    instead of being cut mid-JSON; a capable model that finishes early never sees it.
    """

    def __init__(self, spec, table: TokenTable, stop_ids, budget: int | None = None):
        grammar = spec if isinstance(spec, str) else compile_schema(spec)
        self.table = table
        self.matcher = llguidance.LLMatcher(table.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise SchemaError(self.matcher.get_error())
        self.stop_ids = tuple(sorted(stop_ids))
        self._eos = table.ll.eos_token
        self.budget = budget
        self.reserve = closing_reserve(budget) if budget else 0
        self.emitted = 0
        self._step_ids: tuple[int, frozenset] | None = None  # (emitted, allowed ids) while closing

    @property
    def closing(self) -> bool:
        return bool(self.budget) and self.budget - self.emitted <= self.reserve

    @property
    def done(self) -> bool:
        """The output is complete and nothing but a stop token may follow."""
        return self.matcher.is_stopped() or (self.matcher.is_accepting() and not self._plain_mask().any())

    def can_end(self) -> bool:
        return self.matcher.is_accepting()

    def allows(self, token_id: int) -> bool:
        if self.closing:
            if self._step_ids is None or self._step_ids[0] != self.emitted:
                self._step_ids = (self.emitted, frozenset(self.allowed_ids()))
            return token_id in self._step_ids[1]
        if token_id in self.stop_ids:
            return self.matcher.is_accepting()
        if token_id >= self.table.n_vocab or token_id == self._eos or self.matcher.is_stopped():
            return False
        return self.matcher.validate_tokens([token_id]) == 1

    def _plain_mask(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the ordinary tokens the grammar allows next."""
        if self.matcher.is_stopped():
            return np.zeros(self.table.n_vocab, dtype=bool)
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(words, bitorder="little")[: self.table.n_vocab].astype(bool)
        mask[self._eos] = False
        return mask

    def allowed_ids(self) -> list[int]:
        accepting = self.matcher.is_accepting()
        if self.closing and accepting:
            return list(self.stop_ids)
        mask = self._plain_mask()
        if self.closing:
            mask = self._closing_mask(mask)
        ids = np.flatnonzero(mask).tolist()
        if accepting:
            ids.extend(self.stop_ids)
        return ids

    def _closing_mask(self, mask: np.ndarray) -> np.ndarray:
        """The allowed tokens that finish soonest, by a fixed preference: within a free string (a letter like
        'x' is allowed) the tokens that end it; tokens that close arrays and objects; tokens that end or open a
        string; single punctuation characters (the ':' of a URI, the '-' of a pattern); tokens without digits (a
        number or a date-time fraction can run on forever); else all."""
        t = self.table
        order = (t.quote_close, t.closers, t.quote_close, t.punct, t.no_digits)
        if not any(mask[i] for i in t.letters):
            order = order[1:]
        for prefer in order:
            m = mask & prefer
            if m.any():
                return m
        return mask

    def advance(self, token_id: int) -> None:
        if token_id in self.stop_ids:
            return
        ok = self.matcher.consume_token(token_id)
        assert ok and not self.matcher.is_error(), \
            f"token {token_id} was not allowed by the constraint: {self.matcher.get_error()}"
        self.emitted += 1


def constraint_for(response_format: dict, table: TokenTable, stop_ids, budget: int | None = None) -> JsonConstraint:
    """The per-sequence constraint of a validated request's `response_format` (tool calls: tools.py's)."""
    if response_format["type"] == "tools":
        from pocketlm.serve.tools import ToolCallConstraint
        return ToolCallConstraint(response_format, table, stop_ids, budget=budget)
    return JsonConstraint(response_format["schema"], table, stop_ids, budget=budget)


# ---- checking text (tests, validation of finished replies) ----------------------------------------------------

_BYTE_TABLE: list = []


def _byte_tokenizer():
    """An llguidance tokenizer whose ids 0..255 are the single bytes (256 is the end marker)."""
    if not _BYTE_TABLE:
        class _Bytes:
            tokens = [bytes([b]) for b in range(256)] + [b"\xff<end>"]
            eos_token_id = 256
            bos_token_id = None
            special_token_ids = [256]

            def __call__(self, s):
                return list(s if isinstance(s, bytes) else s.encode("utf-8"))

        _BYTE_TABLE.append(llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes())))
    return _BYTE_TABLE[0]


def initial_state(grammar) -> llguidance.LLMatcher:
    """A text matcher at the start of `grammar` (a string from compile_*, or a JSON schema dict)."""
    grammar = grammar if isinstance(grammar, str) else compile_schema(grammar)
    return llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)


def feed_text(state, text: str):
    """The matcher after `text` (a copy; `state` is unchanged), or None if some prefix of `text` is rejected."""
    m = state.deep_copy()
    data = text.encode("utf-8")
    if m.validate_tokens(list(data)) != len(data):
        return None
    m.consume_tokens(list(data))
    return None if m.is_error() else m


def can_end(state) -> bool:
    """Whether the text fed so far is a complete match."""
    return state.is_accepting()


def matches(grammar, text: str) -> bool:
    """Whether `text` is a complete match of `grammar` (a compiled string or a JSON schema)."""
    state = feed_text(initial_state(grammar), text)
    return state is not None and can_end(state)
