"""Constrained decoding for `response_format` json_object / json_schema: the output is always valid JSON.

A character-level pushdown automaton for JSON (RFC 8259), optionally driven by a JSON schema, is advanced by
the decoded text of each candidate token; a token is allowed iff every character of its text is accepted.
The set of allowed ids for a state is found by walking a trie of all token strings (a branch is cut at the first
rejected character) and cached per automaton state, so the common states (inside a string, between members)
cost one walk each. Greedy requests first try the highest-scoring candidates one by one and only build the full
mask when none of the top 64 fits. The approach is that of Outlines/llguidance (mask = tokens whose text the
grammar accepts from the current state), implemented naively in Python.

Rules and deviations:
- States are immutable tuples, so a walk can branch without copying. Stop tokens are allowed only once the
  value is complete, and after the root value is complete only stop tokens are allowed (the model cannot ramble
  after the JSON). A request cut by max_tokens can still end mid-JSON (finish_reason "length"), as in OpenAI.
- Whitespace between tokens of the JSON is allowed, at most MAX_WS characters in a row (no endless blank runs);
  numbers are at most MAX_NUMBER_CHARS characters; keys of schema-described objects may not contain escapes.
- Byte-fallback tokens are allowed only for ASCII bytes; non-ASCII text comes from ordinary pieces.
- `json_object` means "a JSON object" (OpenAI's json mode), i.e. the schema {"type": "object"}.

Supported schema keywords: type (object, array, string, number, integer, boolean, null, or a list of them),
properties, required, additionalProperties (a boolean; objects with `properties` are closed unless it is
true), items, enum and const (strings, numbers, booleans, null), plus the annotations title, description,
default, examples, $schema, $id, strict. Any other keyword (anyOf, $ref, pattern, minLength, minItems, format,
...) is refused with SchemaError, which the server answers with a 400: a schema it would not enforce is never
silently accepted.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from pocketlm.errors import PocketLMError

MAX_WS = 16
MAX_NUMBER_CHARS = 32
MAX_SCHEMA_DEPTH = 16
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const"}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "strict"}
WS = " \t\n\r"
DIGITS = "0123456789"


class SchemaError(PocketLMError, ValueError):
    """A JSON schema uses a keyword or value that the constrained decoder does not enforce."""


class Node:
    """A compiled schema node (compared by identity inside automaton states)."""

    __slots__ = ("types", "props", "required", "closed", "items", "enum")

    def __init__(self, types, props, required, closed, items, enum):
        self.types = types  # frozenset of TYPES
        self.props = props  # dict key -> Node
        self.required = required  # frozenset of keys
        self.closed = closed  # only `props` keys allowed
        self.items = items  # Node for array elements
        self.enum = enum  # tuple of compact JSON texts, or None


ANY = Node(frozenset(TYPES), {}, frozenset(), False, None, None)
ANY.items = ANY


def check_schema(schema, depth: int = 0, where: str = "schema") -> None:
    """Raise SchemaError naming the first unsupported keyword or malformed value."""
    compile_schema(schema, depth, where)


def compile_schema(schema, depth: int = 0, where: str = "schema") -> Node:
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"{where}: nested deeper than {MAX_SCHEMA_DEPTH}")
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} must be an object, got {type(schema).__name__}")
    unknown = sorted(set(schema) - _KEYWORDS - _ANNOTATIONS)
    if unknown:
        raise SchemaError(f"{where}: keyword(s) {unknown} are not supported; supported: "
                          f"{sorted(_KEYWORDS)}")
    t = schema.get("type", list(TYPES))
    t = [t] if isinstance(t, str) else t
    if not isinstance(t, list) or not t or any(x not in TYPES for x in t):
        raise SchemaError(f"{where}.type must be one of {list(TYPES)} or a list of them, got {t!r:.80}")
    types = set(t)
    if "integer" in types and "number" in types:
        types.discard("integer")
    enum = None
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{where}.enum must be a non-empty list")
        for v in values:
            if isinstance(v, (dict, list)) or (isinstance(v, float) and v != v):
                raise SchemaError(f"{where}.enum values must be strings, numbers, booleans or null, got {v!r:.60}")
        enum = tuple(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in values))
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise SchemaError(f"{where}.properties must be an object")
    for k in props:
        if "\\" in k or '"' in k or any(ord(c) < 0x20 for c in k):
            raise SchemaError(f"{where}.properties key {k!r:.60} needs escapes, which are not supported")
    compiled = {k: compile_schema(v, depth + 1, f"{where}.properties.{k}") for k, v in props.items()}
    required = schema.get("required", [])
    if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
        raise SchemaError(f"{where}.required must be a list of strings")
    extra = schema.get("additionalProperties", None)
    if extra is not None and not isinstance(extra, bool):
        raise SchemaError(f"{where}.additionalProperties: only true or false is supported")
    closed = bool(props) and extra is not True or extra is False
    missing = [r for r in required if closed and r not in props]
    if missing:
        raise SchemaError(f"{where}.required names {missing}, which the closed object cannot have")
    items = compile_schema(schema["items"], depth + 1, f"{where}.items") if "items" in schema else ANY
    return Node(frozenset(types), compiled, frozenset(required), closed, items, enum)


# ---- the automaton: state = (frames tuple, top last; consecutive whitespace count) ---------------------------


def initial_state(node: Node):
    return ((("END",), ("V", node)), 0)


def _value_start(frames, node: Node, c: str):
    """Frames after the first character `c` of a value of schema `node` (replacing the V frame), or None."""
    if node.enum is not None:
        return _feed_frames(frames + (("E", node.enum, 0),), c)
    t = node.types
    if c == "{" and "object" in t:
        return frames + (("OF", node, frozenset()),)
    if c == "[" and "array" in t:
        return frames + (("AF", node),)
    if c == '"' and "string" in t:
        return frames + (("S", 0),)
    if (c == "-" or c in DIGITS) and ("number" in t or "integer" in t):
        phase = "sign" if c == "-" else ("zero" if c == "0" else "int")
        return frames + (("N", phase, "number" not in t, 1),)
    if c == "t" and "boolean" in t:
        return frames + (("L", "rue"),)
    if c == "f" and "boolean" in t:
        return frames + (("L", "alse"),)
    if c == "n" and "null" in t:
        return frames + (("L", "ull"),)
    return None


_NUM_NEXT = {  # phase -> {character class -> next phase}; classes: <0> zero, <d> 1-9, <.>, <e> e/E, <s> +/-
    "sign": {"<0>": "zero", "<d>": "int"},
    "zero": {"<.>": "dot", "<e>": "exp"},
    "int": {"<0>": "int", "<d>": "int", "<.>": "dot", "<e>": "exp"},
    "dot": {"<0>": "frac", "<d>": "frac"},
    "frac": {"<0>": "frac", "<d>": "frac", "<e>": "exp"},
    "exp": {"<0>": "expd", "<d>": "expd", "<s>": "expsign"},
    "expsign": {"<0>": "expd", "<d>": "expd"},
    "expd": {"<0>": "expd", "<d>": "expd"},
}
_NUM_DONE = {"zero", "int", "frac", "expd"}


def _feed_frames(frames, c: str):
    """Advance `frames` by one non-whitespace-handled character; None if rejected."""
    for _ in range(64):  # each pass pops a completed frame and re-feeds c; depth is bounded by the schema
        top = frames[-1]
        kind = top[0]
        rest = frames[:-1]
        if kind == "S":
            esc = top[1]
            if esc == 0:
                if c == '"':
                    return rest
                if c == "\\":
                    return rest + (("S", -1),)
                return frames if c >= " " else None
            if esc == -1:
                if c in '"\\/bfnrt':
                    return rest + (("S", 0),)
                return rest + (("S", 4),) if c == "u" else None
            if c in "0123456789abcdefABCDEF":
                return rest + (("S", esc - 1),)
            return None
        if kind == "V":
            return _value_start(rest, top[1], c)
        if kind == "N":
            _, phase, integer, count = top
            cls = ("<0>" if c == "0" else "<d>" if c in DIGITS else "<e>" if c in "eE" else "<s>" if c in "+-"
                   else "<.>" if c == "." else None)
            nxt = _NUM_NEXT[phase].get(cls)
            if nxt is not None and integer and nxt in ("dot", "exp"):
                nxt = None
            if nxt is not None:
                return rest + (("N", nxt, integer, count + 1),) if count < MAX_NUMBER_CHARS else None
            if phase not in _NUM_DONE:
                return None
            frames = rest  # number complete: pop and re-feed c
            continue
        if kind == "E":
            _, cands, pos = top
            nxt = tuple(k for k in cands if len(k) > pos and k[pos] == c)
            if nxt:
                return rest + (("E", nxt, pos + 1),)
            if any(len(k) == pos for k in cands):
                frames = rest
                continue
            return None
        if kind == "L":
            lit = top[1]
            if c != lit[0]:
                return None
            return rest + (("L", lit[1:]),) if len(lit) > 1 else rest
        if kind in ("OF", "OK"):
            node, seen = top[1], top[2]
            if c == "}" and kind == "OF" and node.required <= seen:
                return rest
            if c == '"' and (not node.closed or any(k not in seen for k in node.props)):
                return rest + (("K", node, seen, ""),)
            return None
        if kind == "K":
            _, node, seen, buf = top
            if c == '"':
                if node.closed and (buf not in node.props or buf in seen):
                    return None
                return rest + (("C", node, seen, buf),)
            if c == "\\" or c < " ":
                return None
            buf += c
            if node.closed and not any(k.startswith(buf) and k not in seen for k in node.props):
                return None
            return rest + (("K", node, seen, buf),)
        if kind == "C":
            if c != ":":
                return None
            _, node, seen, key = top
            return rest + (("ON", node, seen | {key}), ("V", node.props.get(key, ANY)))
        if kind == "ON":
            _, node, seen = top
            if c == "}" and node.required <= seen:
                return rest
            if c == "," and (not node.closed or any(k not in seen for k in node.props)):
                return rest + (("OK", node, seen),)
            return None
        if kind == "AF":
            if c == "]":
                return rest
            return _value_start(rest + (("AN", top[1]),), top[1].items, c)
        if kind == "AN":
            if c == "]":
                return rest
            return rest + (top, ("V", top[1].items)) if c == "," else None
        return None  # END: only whitespace
    return None


_WS_FRAMES = {"V", "OF", "OK", "C", "ON", "AF", "AN", "END"}


def step(state, c: str):
    """The state after character `c`, or None if `c` is not allowed here."""
    frames, ws = state
    top = frames[-1]
    if top[0] == "S" and top[1] == 0 and c != '"' and c != "\\" and c >= " ":
        return state  # fast path: an ordinary character inside a string
    if c in WS:
        kind = top[0]
        if kind in ("N", "E"):  # a number or enum literal may end here
            if kind == "N" and top[1] not in _NUM_DONE or kind == "E" and not any(len(k) == top[2] for k in top[1]):
                return None
            frames = _pop_completed(frames)
            kind = frames[-1][0]
        if kind in _WS_FRAMES and ws < MAX_WS:
            return (frames, ws + 1)
        return None
    frames = _feed_frames(frames, c)
    return None if frames is None else (frames, 0)


def _pop_completed(frames):
    while frames[-1][0] in ("N", "E"):
        top = frames[-1]
        if top[0] == "N" and top[1] not in _NUM_DONE:
            return None
        if top[0] == "E" and not any(len(k) == top[2] for k in top[1]):
            return None
        frames = frames[:-1]
    return frames


def can_end(state) -> bool:
    """Whether the text so far is one complete JSON value (trailing whitespace allowed)."""
    frames = _pop_completed(state[0])
    return frames is not None and frames == (("END",),)


def feed_text(state, text: str):
    for c in text:
        state = step(state, c)
        if state is None:
            return None
    return state


# ---- tokens ---------------------------------------------------------------------------------------------------


class TokenTable:
    """Each token's text (None for control tokens and non-ASCII byte tokens) and a trie over those texts."""

    def __init__(self, tokenizer):
        specials = tokenizer.special_ids
        self.texts: list[str | None] = []
        for i in range(len(tokenizer)):
            piece = tokenizer.id_to_token(i)
            if i in specials:
                text = None
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                b = int(piece[3:5], 16)
                text = chr(b) if b < 0x80 else None
            else:
                text = piece.replace("\u2581", " ") or None
            self.texts.append(text)
        self.trie: dict = {}  # char -> [ids ending here, children]
        for i, text in enumerate(self.texts):
            if not text:
                continue
            node = None
            children = self.trie
            for c in text:
                node = children.get(c)
                if node is None:
                    node = children[c] = [[], {}]
                children = node[1]
            node[0].append(i)
        self.cache: OrderedDict = OrderedDict()  # state -> tuple of allowed ids (LRU)
        self.cache_size = 4096

    def allowed(self, state) -> tuple[int, ...]:
        """All ids whose text is accepted from `state` (control tokens excluded)."""
        hit = self.cache.get(state)
        if hit is not None:
            self.cache.move_to_end(state)
            return hit
        out: list[int] = []
        stack = [(self.trie, state)]
        while stack:
            children, st = stack.pop()
            for c, (ids, sub) in children.items():
                s2 = step(st, c)
                if s2 is None:
                    continue
                out.extend(ids)
                if sub:
                    stack.append((sub, s2))
        result = tuple(out)
        self.cache[state] = result
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return result


_TABLES: dict[int, TokenTable] = {}


def token_table(tokenizer) -> TokenTable:
    table = _TABLES.get(id(tokenizer))
    if table is None:
        table = _TABLES[id(tokenizer)] = TokenTable(tokenizer)
    return table


class JsonConstraint:
    """Per-sequence constraint: which ids may come next, and advancing by the chosen id."""

    def __init__(self, schema: dict, table: TokenTable, stop_ids):
        self.table = table
        self.state = initial_state(compile_schema(schema))
        self.stop_ids = tuple(sorted(stop_ids))

    @property
    def done(self) -> bool:
        return self.state[0] == (("END",),)

    def allows(self, token_id: int) -> bool:
        if token_id in self.stop_ids:
            return can_end(self.state)
        if self.done:
            return False
        text = self.table.texts[token_id] if token_id < len(self.table.texts) else None
        return bool(text) and feed_text(self.state, text) is not None

    def allowed_ids(self) -> list[int]:
        ids = [] if self.done else list(self.table.allowed(self.state))
        if can_end(self.state):
            ids.extend(self.stop_ids)
        return ids

    def advance(self, token_id: int) -> None:
        if token_id in self.stop_ids:
            return
        text = self.table.texts[token_id]
        new = feed_text(self.state, text) if text else None
        assert new is not None, f"token {token_id} ({text!r}) was not allowed by the JSON constraint"
        self.state = new
