"""Tokenizers that are not Llama SentencePiece: GGUF `tokenizer.ggml.model = "gpt2"` (e.g. SmolLM2) and any other
HF `tokenizer.json`. Users reach them through `pocketlm.Tokenizer.from_pretrained`, the one entry point for every
tokenizer source (it returns a `pocketlm.Tokenizer` for the Llama layout and an `HFTokenizer` /
`ByteLevelBPETokenizer` from here otherwise).

`pocketlm.Tokenizer` implements only the Llama SentencePiece layout; GPT-2-style vocabularies (tokens + merges over
byte-level symbols "Ġ", "Ċ", ...) are built here with the HF `tokenizers` library, the pre-tokenizer chosen from
`tokenizer.ggml.pre` the way llama.cpp does (`llama-vocab.cpp`): "smollm" (and "gpt2"/"default") split every digit
on its own, then the GPT-2 regex. Only these pre-tokenizers are accepted; anything else raises TokenizerError.

As in `pocketlm.Tokenizer`, plain `encode(text)` never produces control tokens; `parse_special=True` or
`encode_parts` insert them. CONTROL and USER_DEFINED tokens are matched as whole strings.

Chat for these models is `pocketlm.chat`'s "chatml" format (control tokens by id; the template in the file is
never rendered).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers

from pocketlm.errors import TokenizerError, WeightFormatError

CONTROL, USER_DEFINED = 3, 4
PRE_TOKENIZERS = ("smollm", "gpt2", "default")


class HFTokenizer:
    """A tokenizer run by an HF `tokenizers` backend, with whole-string added tokens handled here (so plain text
    never becomes control ids). Same public surface as `pocketlm.Tokenizer` for encode/decode and the special
    ids. Built from any `tokenizer.json` whose layout is not Llama SentencePiece (`from_tokenizer_json`)."""

    def __init__(self, tokens: Sequence[str], types: Sequence[int], backend: _Backend, *,
                 bos_id: int | None, eos_id: int | None, pad_id: int | None, unk_id: int | None,
                 add_bos_default: bool, source: str = "<memory>"):
        self.source = source
        self._tokens = list(tokens)
        if len(types) != len(self._tokens):
            raise TokenizerError(f"{source}: {len(self._tokens)} tokens but {len(types)} token types")
        if len(set(self._tokens)) != len(self._tokens):
            raise TokenizerError(f"{source}: duplicate tokens in the vocabulary")
        self._types = [int(t) for t in types]
        self._special = {i: t for i, t in enumerate(self._tokens) if types[i] in (CONTROL, USER_DEFINED)}
        alternatives = sorted(self._special.values(), key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(a) for a in alternatives)) if alternatives else None
        self._by_content = {t: i for i, t in self._special.items()}
        self._backend = backend
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id)):
            if value is not None and not 0 <= value < len(self._tokens):
                raise TokenizerError(f"{source}: {name} {value} is outside the vocabulary [0, {len(self._tokens)})")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos_default = add_bos_default

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, config: dict) -> HFTokenizer:
        """Any valid HF `tokenizer.json` plus its `tokenizer_config.json` entries (`config`: bos/eos/pad/unk token
        strings, `add_bos_token`). Returns a `ByteLevelBPETokenizer` when the decoder is byte-level.

        The added tokens and the post-processor are taken out of the backend: added tokens are matched here
        (only with `parse_special` / `encode_parts`) and `<bos>` is added by `encode(add_bos=True)`."""
        where = str(path)
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise TokenizerError(f"{where}: cannot read JSON: {e}") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            vocab = {e[0]: i for i, e in enumerate(vocab) if isinstance(e, list) and e and isinstance(e[0], str)}
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                  for k, v in vocab.items()):
            raise TokenizerError(f"{where}: model.vocab must map strings to integer ids")
        entries = doc.get("added_tokens") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("id"), int)
                                                    and isinstance(e.get("content"), str) and e["content"]
                                                    for e in entries):
            raise TokenizerError(f"{where}: added_tokens must be a list of {{id, content}} objects")
        size = max([len(vocab), *(v + 1 for v in vocab.values()), *(e["id"] + 1 for e in entries)])
        tokens: list[str | None] = [None] * size
        for piece, i in vocab.items():
            if i < 0 or tokens[i] is not None:
                raise TokenizerError(f"{where}: vocab id {i} of {piece!r} is negative or duplicated")
            tokens[i] = piece
        types = [1] * size
        for e in entries:
            i = e["id"]
            if i < 0 or (tokens[i] is not None and tokens[i] != e["content"]):
                raise TokenizerError(f"{where}: added token {i} is {e['content']!r} but vocab id {i} is {tokens[i]!r}")
            tokens[i] = e["content"]
            types[i] = CONTROL if e.get("special", True) else USER_DEFINED
        holes = [i for i, t in enumerate(tokens) if t is None]
        if holes:
            raise TokenizerError(f"{where}: ids {holes[:5]} ({len(holes)} in all) are neither vocab nor added tokens")
        stripped = dict(doc, added_tokens=[], post_processor=None)
        try:
            backend = _Backend.from_str(json.dumps(stripped))
        except Exception as e:  # the Rust side reports its own error type
            raise TokenizerError(f"{where}: not a valid tokenizer.json: {e}") from None
        index = {t: i for i, t in enumerate(tokens)}
        ids = {}
        for key in ("bos", "eos", "pad", "unk"):
            value = config.get(f"{key}_token")
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            if value is not None and (not isinstance(value, str) or value not in index):
                raise TokenizerError(f"{where}: {key}_token {value!r} is not in the vocabulary")
            ids[key] = None if value is None else index[value]
        add_bos = config.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"{where}: add_bos_token is {add_bos!r}, expected true or false")
        decoder = json.dumps(doc.get("decoder"))
        kind = ByteLevelBPETokenizer if '"ByteLevel"' in decoder else HFTokenizer
        return kind(tokens, types, backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                    unk_id=ids["unk"], add_bos_default=add_bos, source=where)

    # ----- encoding ------------------------------------------------------------------------------------------

    def _plain(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids if text else []

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        if not parse_special or self._special_re is None:
            return ids + self._plain(text)
        pos = 0
        for m in self._special_re.finditer(text):
            ids += self._plain(text[pos:m.start()]) + [self._by_content[m.group()]]
            pos = m.end()
        return ids + self._plain(text[pos:])

    def encode_parts(self, parts: Sequence[str | int]) -> list[int]:
        out: list[int] = []
        for p in parts:
            out += [self._check_id(p)] if isinstance(p, int) else self._plain(p)
        return out

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = [self._check_id(i) for i in ids]
        out, run = [], []
        for i in ids:
            if i in self._special:
                if run:
                    out.append(self._backend.decode(run, skip_special_tokens=False))
                    run = []
                if not skip_special:
                    out.append(self._special[i])
            else:
                run.append(i)
        if run:
            out.append(self._backend.decode(run, skip_special_tokens=False))
        return "".join(out)

    # ----- vocabulary ----------------------------------------------------------------------------------------

    def _check_id(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._tokens):
            raise TokenizerError(f"token id {i!r} is outside the vocabulary [0, {len(self._tokens)})")
        return i

    def token_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece) if piece not in self._by_content else self._by_content[piece]

    def id_to_token(self, i: int) -> str:
        return self._tokens[self._check_id(i)]

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    padded_vocab_size = vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special)

    def save_pretrained(self, folder: str | os.PathLike, *, chat_template: str | None = None) -> None:
        """Write `tokenizer.json` (the backend's model, pre-tokenizer and decoder, with the control and
        user-defined tokens as added tokens) and `tokenizer_config.json` (bos/eos/unk/pad, add_bos_token and
        `chat_template` when given) into `folder`; `from_tokenizer_json` reads them back to the same ids."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = json.loads(self._backend.to_str())
        doc["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": self._types[i] == CONTROL}
                               for i, t in sorted(self._special.items())]
        (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        config: dict = {"add_bos_token": self.add_bos_default, "add_eos_token": False,
                        "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id),
                       ("pad_token", self.pad_id)):
            if i is not None:
                config[key] = self._tokens[i]
        if chat_template is not None:
            config["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                      encoding="utf-8")

    @property
    def tokens(self) -> list[str]:
        """Every token string, by id (added tokens included)."""
        return list(self._tokens)

    @property
    def token_types(self) -> list[int]:
        """GGUF token type of every id (NORMAL, CONTROL, USER_DEFINED, ...)."""
        return list(self._types)

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The BPE merges in rank order, as the backend holds them."""
        model = json.loads(self._backend.to_str())["model"]
        if model.get("type") != "BPE":
            raise TokenizerError(f"{self.source}: a {model.get('type')} tokenizer has no merges")
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} ids, {len(self._special)} special)"


class ByteLevelBPETokenizer(HFTokenizer):
    """GPT-2 style byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`, or a byte-level `tokenizer.json`)."""

    @classmethod
    def from_vocabulary(cls, tokens: Sequence[str], merges: Sequence[tuple[str, str]], types: Sequence[int], *,
                        bos_id: int | None, eos_id: int | None, pad_id: int | None, unk_id: int | None,
                        add_bos_default: bool, source: str = "<memory>") -> ByteLevelBPETokenizer:
        """Tokens + merges over byte-level symbols, with llama.cpp's "smollm"/"gpt2" pre-tokenizer (each digit
        split off, then the GPT-2 regex)."""
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise TokenizerError(f"{source}: duplicate tokens in the vocabulary")
        try:
            backend = _Backend(models.BPE(vocab=vocab, merges=list(merges)))
        except Exception as e:  # the Rust side reports its own error type
            raise TokenizerError(f"{source}: cannot build the BPE model: {e}") from None
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        backend.decoder = decoders.ByteLevel()
        return cls(tokens, types, backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, unk_id=unk_id,
                   add_bos_default=add_bos_default, source=source)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> ByteLevelBPETokenizer:
        """The vocabulary of a GGUF file whose `tokenizer.ggml.model` is "gpt2"."""
        from pocketlm.formats.gguf import GGUFFile

        where = str(path)
        try:
            with GGUFFile(path) as g:
                if g.metadata_get("tokenizer.ggml.model", "string") != "gpt2":
                    raise TokenizerError(f"{where}: tokenizer.ggml.model is not 'gpt2'")
                pre = g.metadata_get("tokenizer.ggml.pre", "string", "default")
                tokens = list(g.metadata_get("tokenizer.ggml.tokens", "array[string]"))
                types = [int(t) for t in g.metadata_get("tokenizer.ggml.token_type", ("array[int32]", "array[uint32]"))]
                merges = list(g.metadata_get("tokenizer.ggml.merges", "array[string]"))
                ids = {k: g.metadata_get(f"tokenizer.ggml.{k}_token_id", ("uint32", "int32"), None)
                       for k in ("bos", "eos", "padding", "unknown")}
                add_bos = g.metadata_get("tokenizer.ggml.add_bos_token", "bool", False)
        except WeightFormatError as e:
            raise TokenizerError(str(e)) from None
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported; supported: {PRE_TOKENIZERS}")
        if len(types) != len(tokens):
            raise TokenizerError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep or not left or not right:
                raise TokenizerError(f"{where}: malformed merge {m!r:.60}")
            pairs.append((left, right))
        return cls.from_vocabulary(tokens, pairs, types, bos_id=ids["bos"], eos_id=ids["eos"],
                                   pad_id=ids["padding"], unk_id=ids["unknown"], add_bos_default=add_bos, source=where)
