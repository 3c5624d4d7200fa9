"""Byte-level BPE tokenizers from GGUF files with `tokenizer.ggml.model = "gpt2"` (e.g. SmolLM2), and ChatML.

`pocketlm.Tokenizer` reads only the Llama SentencePiece layout; GPT-2-style vocabularies (tokens + merges over
byte-level symbols "Ġ", "Ċ", ...) are built here with the HF `tokenizers` library, the pre-tokenizer chosen from
`tokenizer.ggml.pre` the way llama.cpp does (`llama-vocab.cpp`): "smollm" (and "gpt2"/"default") split every digit
on its own, then the GPT-2 regex. Only these pre-tokenizers are accepted; anything else raises TokenizerError.

As in `pocketlm.Tokenizer`, plain `encode(text)` never produces control tokens; `parse_special=True` or
`encode_parts` insert them. CONTROL and USER_DEFINED tokens are matched as whole strings.

Chat for these models is `pocketlm.chat`'s "chatml" format (control tokens by id; the template in the file is
never rendered).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

from tokenizers import Regex
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers

from pocketlm.errors import TokenizerError, WeightFormatError

CONTROL, USER_DEFINED = 3, 4
PRE_TOKENIZERS = ("smollm", "gpt2", "default")


class ByteLevelBPETokenizer:
    """GPT-2 style byte-level BPE with whole-string special tokens (same public surface as pocketlm.Tokenizer
    for encode/decode and the special ids)."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[tuple[str, str]], types: Sequence[int], *,
                 bos_id: int | None, eos_id: int | None, pad_id: int | None, unk_id: int | None,
                 add_bos_default: bool, source: str = "<memory>"):
        self.source = source
        self._tokens = list(tokens)
        vocab = {t: i for i, t in enumerate(self._tokens)}
        if len(vocab) != len(self._tokens):
            raise TokenizerError(f"{source}: duplicate tokens in the vocabulary")
        self._special = {i: t for i, t in enumerate(self._tokens) if types[i] in (CONTROL, USER_DEFINED)}
        alternatives = sorted(self._special.values(), key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(a) for a in alternatives)) if alternatives else None
        self._by_content = {t: i for i, t in self._special.items()}
        try:
            self._backend = _Backend(models.BPE(vocab=vocab, merges=list(merges)))
        except Exception as e:  # the Rust side reports its own error type
            raise TokenizerError(f"{source}: cannot build the BPE model: {e}") from None
        self._backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        self._backend.decoder = decoders.ByteLevel()
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id)):
            if value is not None and not 0 <= value < len(self._tokens):
                raise TokenizerError(f"{source}: {name} {value} is outside the vocabulary [0, {len(self._tokens)})")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos_default = add_bos_default

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> ByteLevelBPETokenizer:
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
        return cls(tokens, pairs, types, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"],
                   unk_id=ids["unknown"], add_bos_default=add_bos, source=where)

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

    def __repr__(self) -> str:
        return f"ByteLevelBPETokenizer({self.source!r}, {len(self)} ids, {len(self._special)} special)"
