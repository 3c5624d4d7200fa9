"""The Phi-3 tokenizer: Llama-2 SentencePiece BPE plus the added chat tokens.

Pipeline (phi3-spec.md §5.1; the layout of the official Phi-3 `tokenizer.json`):

    text -> Prepend("▁") -> Replace(" ", "▁") -> BPE (32000 pieces, byte fallback, fused <unk>) -> ids
    ids  -> Replace("▁", " ") -> ByteFallback -> Fuse -> Strip one leading " " -> text

The BPE itself runs in the HF `tokenizers` library (Rust). Merges are derived from the SentencePiece scores the
way transformers' SentencePiece extractor does (`generate_merges` in `tokenization_utils_base.py`): every piece
that splits into two pieces of the vocabulary gives a merge, ranked by the score of the merged piece.

Deviations from the reference pipelines, on purpose:
- The added tokens (`<unk>` 0, `<s>` 1, `</s>` 2, `<|endoftext|>` 32000 ... `<|user|>` 32010) are NOT given to
  the backend. `encode(text)` treats all text as ordinary text, so user text can never become control ids
  (RELIABILITY.md §2, special-token injection). `encode(text, parse_special=True)` and `encode_parts` apply
  the reference rules themselves: split on added-token strings (leftmost, longest), strip the whitespace
  (Unicode White_Space, Rust's `char::is_whitespace`) that follows a token flagged `rstrip` / precedes one
  flagged `lstrip`, and give each remaining text segment its own dummy prefix "▁" (HF normalizes each split;
  llama.cpp's `is_prev_special`). Phi-3 flags `rstrip` on every added token except `<unk>`, `<s>` and
  `<|endoftext|>` (official tokenizer.json `added_tokens`; llama.cpp's phi3 special case in llama-vocab.cpp).
- `decode(..., skip_special=True)` drops every added token, including `</s>` (flagged special=false by Phi-3,
  so transformers would keep it).
- Inherent Llama-2 limitation: U+2581 "▁" in the input decodes as a space; every other string round-trips,
  `decode(encode(s)) == s`.
- Ids 32011..32063 are padding rows of the embedding (the model has 32064 rows, the tokenizer 32011 ids):
  they decode to "" and `id_to_token` refuses them; ids outside [0, padded_vocab_size) raise TokenizerError.

Sources: huggingface/transformers `convert_slow_tokenizer.py` (LlamaConverter), huggingface/tokenizers
`added_vocabulary.rs` (strip rules), ggml-org/llama.cpp `src/llama-vocab.cpp` (phi3 attributes, SPM tokenizer).
"""

from __future__ import annotations

import functools
import json
import operator
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as _Backend
from tokenizers import models as _models
from tokenizers import normalizers as _normalizers

from pocketlm.errors import TokenizerError, WeightFormatError

if TYPE_CHECKING:
    from pocketlm.quant.gguf_tokenizer import HFTokenizer

SPIECE_UNDERLINE = "\u2581"
# Unicode White_Space = Rust `char::is_whitespace`, what HF uses for lstrip/rstrip (Python's isspace() differs:
# it also counts U+001C..U+001F).
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
              "\u200a\u2028\u2029\u202f\u205f\u3000")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# SentencePiece `ModelProto.SentencePiece.Type` = GGUF `tokenizer.ggml.token_type` values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Phi-3 rstrip rule (llama.cpp llama-vocab.cpp, phi3 case): every added token strips the whitespace after it,
# except these three.
PHI3_NO_RSTRIP = frozenset({"<unk>", "<s>", "<|endoftext|>"})
PHI3_PADDED_VOCAB_SIZE = 32064  # embedding rows of every Llama-tokenizer Phi-3 checkpoint (phi3-spec §5.1)
# Special tokens of the bundled tokenizer: GGUF metadata of llama.cpp's ggml-vocab-phi-3.gguf (bos 1, eos 32000,
# unk 0, pad 32000, add_bos_token true), which match Phi-3-mini's tokenizer_config.json.
_PHI3_CONFIG = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
                "pad_token": "<|endoftext|>", "add_bos_token": True}

_NORMALIZER_JSON = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
    {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}]}
_DECODER_JSON = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}


# GGUF `tokenizer.ggml.model` values `from_pretrained` reads: SentencePiece BPE here, byte-level BPE in
# `pocketlm.quant.gguf_tokenizer`.
GGUF_TOKENIZER_MODELS = ("llama", "gpt2")


class UnsupportedTokenizerError(TokenizerError):
    """The file is well formed but uses a tokenizer kind pocketlm does not implement (the message names it)."""


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole string (never produced by BPE), with HF's whitespace-strip flags."""

    id: int
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


def generate_merges(pieces: Sequence[str], scores: Sequence[float], mergeable: Sequence[bool]) -> list[tuple[str, str]]:
    """BPE merges from SentencePiece scores, in transformers' order (`generate_merges` with vocab_scores).

    Every mergeable piece that splits into two vocabulary pieces gives one merge per split (splits ordered by
    the ids of their halves); merges are sorted by the merged piece's score, highest first (stable, ties
    broken by the longer left half, then the longer right half).
    """
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, score, ok in zip(pieces, scores, mergeable):
        if not ok:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, float(score)) for left, right in local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


class Tokenizer:
    """Phi-3 (Llama-2 SentencePiece BPE) tokenizer. Build it with `default()` or `from_pretrained(path)`.

    Args:
        pieces: the SentencePiece vocabulary, id -> piece (32000 for Phi-3).
        merges: BPE merges over `pieces`, highest priority first.
        added_tokens: tokens matched as whole strings: control/chat tokens (ids >= len(pieces)) and the
            SentencePiece control pieces (`<unk>`, `<s>`, `</s>`), whose content must equal their piece.
        bos_id, eos_id, unk_id, pad_id: special ids (None where the files name none; byte fallback means no
            text needs unk_id, so files with `"unk_token": null` load).
        add_bos_default: whether the files ask for `<s>` in front of every sequence.
        padded_vocab_size: embedding rows of the model (>= len(self)); ids in between are padding.
        source: file the tokenizer came from, used in error messages.
    """

    def __init__(self, pieces: Sequence[str], merges: Sequence[tuple[str, str]], added_tokens: Iterable[AddedToken],
                 *, bos_id: int | None, eos_id: int | None, unk_id: int | None, pad_id: int | None = None,
                 add_bos_default: bool = False, padded_vocab_size: int | None = None,
                 source: str = "<memory>") -> None:
        self.source = source
        self._pieces = list(pieces)
        self._vocab = {p: i for i, p in enumerate(self._pieces)}
        if len(self._vocab) != len(self._pieces):
            dup = next(p for i, p in enumerate(self._pieces) if self._vocab[p] != i)
            raise TokenizerError(f"{source}: piece {dup!r} appears twice in the vocabulary")
        _check_byte_pieces(self._pieces, source)
        self._merges = [tuple(m) for m in merges]
        for left, right in self._merges:
            if left not in self._vocab or right not in self._vocab or left + right not in self._vocab:
                raise TokenizerError(f"{source}: merge {(left, right)!r} uses a piece outside the vocabulary")

        self._added = {}
        for tok in sorted(added_tokens, key=lambda t: t.id):
            if not isinstance(tok.content, str) or not tok.content:
                raise TokenizerError(f"{source}: added token {tok.id} has empty or non-string content {tok.content!r}")
            if tok.id in self._added:
                raise TokenizerError(f"{source}: added token id {tok.id} appears twice")
            if tok.id < 0:
                raise TokenizerError(f"{source}: added token {tok.content!r} has negative id {tok.id}")
            if tok.id < len(self._pieces) and self._pieces[tok.id] != tok.content:
                raise TokenizerError(f"{source}: added token {tok.id} is {tok.content!r} but piece {tok.id} "
                                     f"is {self._pieces[tok.id]!r}")
            self._added[tok.id] = tok
        self._size = max([len(self._pieces), *(t.id + 1 for t in self._added.values())])
        missing = [i for i in range(len(self._pieces), self._size) if i not in self._added]
        if missing:
            raise TokenizerError(f"{source}: ids {missing[:5]} (of {len(missing)}) are neither pieces nor added "
                                 f"tokens")
        self._by_content = {t.content: t for t in self._added.values()}
        if len(self._by_content) != len(self._added):
            raise TokenizerError(f"{source}: two added tokens share the same content")
        # Leftmost match; among matches at the same position the longest wins (HF: aho-corasick LeftmostLongest).
        alternatives = sorted(self._by_content, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(c) for c in alternatives)) if alternatives else None

        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id), ("pad_id", pad_id)):
            if value is not None and not (isinstance(value, int) and 0 <= value < self._size):
                raise TokenizerError(f"{source}: {name} {value!r} is outside the vocabulary [0, {self._size})")
        if unk_id is not None and unk_id >= len(self._pieces):
            raise TokenizerError(f"{source}: unk_id {unk_id!r} must be a SentencePiece piece id "
                                 f"< {len(self._pieces)}")
        self._bos, self._eos, self._unk, self._pad = bos_id, eos_id, unk_id, pad_id
        self._add_bos_default = bool(add_bos_default)
        self._padded = self._size if padded_vocab_size is None else int(padded_vocab_size)
        if self._padded < self._size:
            raise TokenizerError(f"{source}: padded vocabulary size {self._padded} is smaller than the "
                                 f"tokenizer's {self._size} ids")

        try:
            model = _models.BPE(vocab=self._vocab, merges=self._merges,
                                unk_token=None if unk_id is None else self._pieces[unk_id],
                                fuse_unk=True, byte_fallback=True)
        except Exception as e:  # the Rust side reports its own error type
            raise TokenizerError(f"{source}: cannot build the BPE model: {e}") from None
        self._backend = _Backend(model)
        self._backend.normalizer = _normalizers.Sequence(
            [_normalizers.Prepend(SPIECE_UNDERLINE), _normalizers.Replace(" ", SPIECE_UNDERLINE)])

    # ----- construction ------------------------------------------------------------------------------------

    @classmethod
    def default(cls) -> Tokenizer:
        """The bundled Phi-3 tokenizer (`pocketlm/assets/phi3-tokenizer.json`, see TOKENIZER-PROVENANCE.md)."""
        return _default_tokenizer()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer | HFTokenizer:
        """Load a tokenizer from a checkpoint folder, a `tokenizer.json` or a GGUF file: the one entry point for
        every model pocketlm runs (the CLI, server and converters use it too).

        Args:
            path: a `.gguf` file (`tokenizer.ggml.model` "llama" or "gpt2"), a `tokenizer.json` file, or a
                folder holding `tokenizer.json` (HF layout; preferred) or `tokenizer.model` (SentencePiece) plus
                optional `tokenizer_config.json`, `added_tokens.json`, `special_tokens_map.json` and
                `config.json` (for `vocab_size`, the padded embedding size).

        Returns:
            a `Tokenizer` for the Llama SentencePiece layout (Phi-3 and other Llama-vocabulary models); for GGUF
            "gpt2" vocabularies and every other `tokenizer.json` layout, a `pocketlm.quant.gguf_tokenizer`
            `HFTokenizer` (`ByteLevelBPETokenizer` when byte-level), which has the same encode/decode/special-id
            surface.

        Raises:
            UnsupportedTokenizerError: a GGUF names a `tokenizer.ggml.model` other than "llama"/"gpt2".
            TokenizerError: the path is missing, or a file is corrupt or inconsistent (the message names it).
        """
        p = Path(path)
        if p.is_file() and p.suffix == ".gguf":
            return _from_gguf(p)
        if p.is_file() and p.suffix == ".json":  # a bare tokenizer.json: its folder's config files still apply
            p = p.parent if p.name == "tokenizer.json" else p
            if p.is_file():
                return _from_tokenizer_json(p, {}, None)
        if not p.is_dir():
            raise TokenizerError(f"{p}: not a checkpoint folder or a .gguf file")
        from pocketlm.api import gguf_folder_file
        gguf = gguf_folder_file(p)  # a folder holding one GGUF file and no config.json: that file's vocabulary
        if gguf is not None and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            return _from_gguf(gguf)
        config = _read_json(p / "tokenizer_config.json", optional=True) or {}
        special_map = _read_json(p / "special_tokens_map.json", optional=True) or {}
        for key, value in special_map.items():  # tokenizer_config.json wins where both name a token
            config.setdefault(key, value)
        model_config = _read_json(p / "config.json", optional=True) or {}
        padded = model_config.get("vocab_size")
        if padded is not None and (not isinstance(padded, int) or isinstance(padded, bool) or padded <= 0):
            raise TokenizerError(f"{p / 'config.json'}: vocab_size {padded!r} is not a positive integer")
        if (p / "tokenizer.json").is_file():
            return _from_tokenizer_json(p / "tokenizer.json", config, padded)
        if (p / "tokenizer.model").is_file():
            return _from_sentencepiece(p / "tokenizer.model", config, p / "added_tokens.json", padded)
        raise TokenizerError(f"{p}: no tokenizer.json or tokenizer.model in the folder")

    # ----- encoding ----------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Text -> ids.

        Args:
            text: any string. Without `parse_special` it is all ordinary text: "<|end|>" gives ordinary pieces.
            add_bos: put `bos_id` first.
            parse_special: split on the added-token strings and apply their strip rules as the reference
                tokenizer does. Only for trusted text; chat code uses `encode_parts`.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}: {text!r:.80}")
        parts: list[str | int] = self._split_special(text) if parse_special else [text]
        ids = self.encode_parts(parts)
        if add_bos:
            if self._bos is None:
                raise TokenizerError(f"{self.source}: add_bos=True but the tokenizer has no bos token")
            ids.insert(0, self._bos)
        return ids

    def encode_parts(self, parts: Sequence[str | int]) -> list[int]:
        """Text parts and control ids -> ids, as if the reference had tokenized the concatenation with special
        parsing: `str` parts are ordinary text (never parsed for added tokens), `int` parts are added-token
        ids inserted as is, and the strip flags of each id eat the whitespace of the neighbouring text."""
        items: list[str | int] = []  # adjacent strings joined: a strip may run across part boundaries
        for i, part in enumerate(parts):
            if isinstance(part, str):
                if items and isinstance(items[-1], str):
                    items[-1] += part
                else:
                    items.append(part)
            elif isinstance(part, int) and not isinstance(part, bool):
                if part not in self._added:
                    raise TokenizerError(f"encode_parts: part {i} is id {part}, which is not an added token id "
                                         f"({sorted(self._added)})")
                items.append(part)
            else:
                raise TokenizerError(f"encode_parts: part {i} must be str or int, got {type(part).__name__}: "
                                     f"{part!r:.80}")
        ids: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, int):
                ids.append(item)
                continue
            if i > 0 and self._added[items[i - 1]].rstrip:
                item = item.lstrip(WHITESPACE)
            if i + 1 < len(items) and self._added[items[i + 1]].lstrip:
                item = item.rstrip(WHITESPACE)
            if item:
                ids.extend(self._backend.encode(item, add_special_tokens=False).ids)
        return ids

    def _split_special(self, text: str) -> list[str | int]:
        if self._special_re is None:
            return [text]
        parts: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            parts.append(text[pos:m.start()])
            parts.append(self._by_content[m.group()].id)
            pos = m.end()
        parts.append(text[pos:])
        return parts

    # ----- decoding ----------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Ids -> text; the exact inverse of `encode` for ordinary text (except U+2581, see module docstring).

        Args:
            ids: token ids (ints, numpy or torch integer scalars). Padding ids (>= len(self), < padded size)
                decode to nothing.
            skip_special: drop added tokens (`<s>`, `<|end|>`, ...) instead of writing their text.
        """
        out: list[str] = []
        pending: bytearray = bytearray()  # a run of <0xNN> pieces, decoded together (HF ByteFallback)

        def flush() -> None:
            if pending:
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(pending))  # HF: one U+FFFD per byte token of an invalid run
                pending.clear()

        for i in ids:
            i = self._check_id(i)
            if i >= self._size:
                continue
            tok = self._added.get(i)
            if tok is not None:
                if not skip_special:
                    flush()
                    out.append(tok.content)
                continue
            piece = self._pieces[i]
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                pending.append(int(m.group(1), 16))
            else:
                flush()
                out.append(piece.replace(SPIECE_UNDERLINE, " "))
        flush()
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text

    def _check_id(self, i: Any) -> int:
        try:
            if isinstance(i, bool):
                raise TypeError
            value = operator.index(i)
        except TypeError:
            raise TokenizerError(f"token id must be an integer, got {type(i).__name__}: {i!r:.80}") from None
        if not 0 <= value < self._padded:
            raise TokenizerError(f"token id {value} is outside [0, {self._padded})")
        return value

    # ----- vocabulary --------------------------------------------------------------------------------------

    def token_to_id(self, piece: str) -> int | None:
        """The id of a piece or added-token string, or None."""
        tok = self._by_content.get(piece)
        return tok.id if tok is not None else self._vocab.get(piece)

    def id_to_token(self, i: int) -> str:
        """The piece (or added-token content) of an id; padding ids raise TokenizerError."""
        i = self._check_id(i)
        if i >= self._size:
            raise TokenizerError(f"token id {i} is a padding row (the tokenizer defines ids [0, {self._size}))")
        tok = self._added.get(i)
        return tok.content if tok is not None else self._pieces[i]

    def __len__(self) -> int:
        return self._size

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer defines (32011 for Phi-3); same as len()."""
        return self._size

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows of the model (32064 for Phi-3); ids in [vocab_size, padded_vocab_size) are padding."""
        return self._padded

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def pad_id(self) -> int | None:
        return self._pad

    @property
    def add_bos_default(self) -> bool:
        """Whether the tokenizer files ask for `<s>` in front of each sequence (GGUF `add_bos_token`)."""
        return self._add_bos_default

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all added tokens (control and chat tokens, `<unk>`, `<s>`, `</s>`)."""
        return frozenset(self._added)

    @property
    def added_tokens(self) -> dict[int, str]:
        """Added-token id -> content."""
        return {i: t.content for i, t in self._added.items()}

    def added_token(self, i: int) -> AddedToken:
        """The full record (flags included) of an added token."""
        if i not in self._added:
            raise TokenizerError(f"id {i!r} is not an added token")
        return self._added[i]

    # ----- saving ------------------------------------------------------------------------------------------

    def to_tokenizer_json(self) -> str:
        """The official-layout HF `tokenizer.json` text (deterministic)."""
        post = None
        if self._add_bos_default and self._bos is not None:
            bos = self.id_to_token(self._bos)
            post = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos: {"id": bos, "ids": [self._bos], "tokens": [bos]}}}
        space_free = all(" " not in left and " " not in right for left, right in self._merges)
        doc = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": t.id, "content": t.content, "single_word": False, "lstrip": t.lstrip,
                              "rstrip": t.rstrip, "normalized": False, "special": t.special}
                             for t in self._added.values()],
            "normalizer": _NORMALIZER_JSON,
            "pre_tokenizer": None,
            "post_processor": post,
            "decoder": _DECODER_JSON,
            "model": {"type": "BPE", "dropout": None,
                      "unk_token": None if self._unk is None else self._pieces[self._unk],
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": True, "vocab": self._vocab,
                      "merges": [f"{l} {r}" if space_free else [l, r] for l, r in self._merges]},
        }
        return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"

    def save_pretrained(self, folder: str | os.PathLike[str], *, chat_template: str | None = None) -> None:
        """Write `tokenizer.json` (official layout) and `tokenizer_config.json` (added tokens, bos/eos/unk/pad,
        add_bos_token, and `chat_template` when given, for other tools) into `folder`, which `from_pretrained`
        and transformers' fast tokenizer both load to the same ids."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self.to_tokenizer_json(), encoding="utf-8")
        config: dict[str, Any] = {
            "add_bos_token": self._add_bos_default,
            "add_eos_token": False,
            "added_tokens_decoder": {str(t.id): {"content": t.content, "lstrip": t.lstrip, "normalized": False,
                                                 "rstrip": t.rstrip, "single_word": False, "special": t.special}
                                     for t in self._added.values()},
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        for key, i in (("bos_token", self._bos), ("eos_token", self._eos), ("unk_token", self._unk),
                       ("pad_token", self._pad)):
            if i is not None:
                config[key] = self.id_to_token(i)
        if chat_template is not None:
            config["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                      encoding="utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, {self._size} ids, {len(self._added)} added tokens)"


# ----- loaders -----------------------------------------------------------------------------------------------


@functools.cache
def _default_tokenizer() -> Tokenizer:
    asset = resources.files("pocketlm") / "assets" / "phi3-tokenizer.json"
    with resources.as_file(asset) as path:
        return _from_tokenizer_json(Path(path), dict(_PHI3_CONFIG), PHI3_PADDED_VOCAB_SIZE)


def _read_json(path: Path, *, optional: bool = False) -> Any:
    if optional and not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON: {e}") from None


def _check_byte_pieces(pieces: Sequence[str], source: str) -> None:
    """Byte fallback needs all 256 `<0xNN>` pieces (upper-case hex, as SentencePiece writes them)."""
    found = set()
    for p in pieces:
        if p.startswith("<0x") and p.endswith(">") and len(p) <= 8:
            m = re.fullmatch(r"<0x([0-9A-F]{2})>", p)
            if not m:
                raise TokenizerError(f"{source}: malformed byte piece {p!r} (expected <0x00>..<0xFF>)")
            found.add(int(m.group(1), 16))
    if len(found) != 256:
        missing = sorted(set(range(256)) - found)
        raise TokenizerError(f"{source}: byte fallback needs all 256 <0xNN> pieces; missing "
                             f"{['<0x%02X>' % b for b in missing[:5]]} ({len(missing)} in all)")


def _flag(entry: dict, key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise TokenizerError(f"{where}: {key} is {value!r}, expected true or false")
    return value


def _added_from_entries(entries: Iterable[tuple[Any, dict]], where: str) -> list[AddedToken]:
    """AddedToken records from tokenizer.json `added_tokens` / tokenizer_config.json `added_tokens_decoder`."""
    out = []
    for raw_id, entry in entries:
        try:
            i = int(raw_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"{where}: added token id {raw_id!r} is not an integer") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"{where}: added token {i} has no string content: {entry!r:.120}")
        if _flag(entry, "single_word", where) or _flag(entry, "normalized", where):
            raise TokenizerError(f"{where}: added token {entry['content']!r} uses single_word/normalized matching, "
                                 f"which pocketlm does not implement")
        out.append(AddedToken(i, entry["content"], special=bool(entry.get("special", True)),
                              lstrip=_flag(entry, "lstrip", where), rstrip=_flag(entry, "rstrip", where)))
    return out


def _token_id(config: dict, key: str, tok_index: dict[str, int], where: str) -> int | None:
    value = config.get(key)
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str) or value not in tok_index:
        raise TokenizerError(f"{where}: {key} {value!r} is not in the vocabulary")
    return tok_index[value]


def _specials_from_config(config: dict, pieces: Sequence[str], added: Sequence[AddedToken], where: str,
                          default_bos: int | None, default_add_bos: bool) -> dict[str, Any]:
    index = {p: i for i, p in enumerate(pieces)}
    index.update({t.content: t.id for t in added})
    add_bos = config.get("add_bos_token", default_add_bos)
    if not isinstance(add_bos, bool):
        raise TokenizerError(f"{where}: add_bos_token is {add_bos!r}, expected true or false")
    bos = _token_id(config, "bos_token", index, where)
    return {"bos_id": default_bos if bos is None else bos,
            "eos_id": _token_id(config, "eos_token", index, where),
            "pad_id": _token_id(config, "pad_token", index, where),
            "add_bos_default": add_bos}


def _from_tokenizer_json(path: Path, config: dict, padded: int | None) -> Tokenizer:
    doc = _read_json(path)
    where = str(path)
    if not isinstance(doc, dict):
        raise TokenizerError(f"{where}: top level is {type(doc).__name__}, expected an object")
    model = doc.get("model")
    if not (isinstance(model, dict) and model.get("type") == "BPE" and model.get("byte_fallback") is True
            and doc.get("normalizer") == _NORMALIZER_JSON and doc.get("pre_tokenizer") is None
            and doc.get("decoder") == _DECODER_JSON):
        # Not the Llama SentencePiece layout (byte-level BPE, Metaspace, WordPiece, ...): the HF backend runs the
        # whole pipeline from the file, with added tokens matched by pocketlm.
        from pocketlm.quant.gguf_tokenizer import HFTokenizer
        return HFTokenizer.from_tokenizer_json(path, config)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise TokenizerError(f"{where}: model.vocab must map strings to integer ids")
    pieces: list[str | None] = [None] * len(vocab)
    for piece, i in vocab.items():
        if not 0 <= i < len(vocab) or pieces[i] is not None:
            raise TokenizerError(f"{where}: vocab id {i} of {piece!r} is duplicated or outside [0, {len(vocab)})")
        pieces[i] = piece
    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TokenizerError(f"{where}: malformed merge {m!r:.80}")
        merges.append((pair[0], pair[1]))
    entries = doc.get("added_tokens") or []
    if not isinstance(entries, list):
        raise TokenizerError(f"{where}: added_tokens must be a list")
    added = _added_from_entries([(e.get("id") if isinstance(e, dict) else None, e) for e in entries], where)
    unk = model.get("unk_token")  # null is valid: with byte fallback no text needs <unk>
    if unk is not None and unk not in vocab:
        raise TokenizerError(f"{where}: unk_token {unk!r} is not in the vocabulary")
    default_bos, default_add_bos = None, False
    post = doc.get("post_processor")
    if isinstance(post, dict) and post.get("type") == "TemplateProcessing":
        first = (post.get("single") or [{}])[0]
        if "SpecialToken" in first:
            name = first["SpecialToken"].get("id")
            default_bos = {t.content: t.id for t in added}.get(name, vocab.get(name))
            default_add_bos = default_bos is not None
    specials = _specials_from_config(config, pieces, added, where, default_bos, default_add_bos)
    return Tokenizer(pieces, merges, added, unk_id=None if unk is None else vocab[unk], padded_vocab_size=padded,
                     source=where, **specials)


def _from_sentencepiece(path: Path, config: dict, added_json: Path, padded: int | None) -> Tokenizer:
    from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf is only needed for this path

    where = str(path)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError, and RuntimeWarning-ish errors on some versions
        raise TokenizerError(f"{where}: not a SentencePiece model: {e}") from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE or not proto.trainer_spec.byte_fallback:
        raise TokenizerError(f"{where}: model_type {proto.trainer_spec.model_type} / byte_fallback "
                             f"{proto.trainer_spec.byte_fallback}: only BPE with byte fallback (Llama) is supported")
    if not proto.pieces:
        raise TokenizerError(f"{where}: the model has no pieces")
    pieces = [p.piece for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    merges = generate_merges(pieces, [p.score for p in proto.pieces], [t == NORMAL for t in types])
    unk_ids = [i for i, t in enumerate(types) if t == UNKNOWN]
    if len(unk_ids) != 1:
        raise TokenizerError(f"{where}: expected exactly one UNKNOWN piece, found ids {unk_ids[:5]}")
    if "added_tokens_decoder" in config:
        decoder = config["added_tokens_decoder"]
        if not isinstance(decoder, dict):
            raise TokenizerError(f"{where}: tokenizer_config.json added_tokens_decoder must be an object")
        added = _added_from_entries(decoder.items(), "tokenizer_config.json")
    else:  # transformers' slow-tokenizer defaults: control/unknown pieces and added_tokens.json, no strip flags
        added = [AddedToken(i, pieces[i], special=True) for i, t in enumerate(types) if t in (UNKNOWN, CONTROL)]
        extra = _read_json(added_json, optional=True) or {}
        if not isinstance(extra, dict):
            raise TokenizerError(f"{added_json}: expected an object mapping token strings to ids")
        for content, i in extra.items():
            if not isinstance(i, int) or isinstance(i, bool):
                raise TokenizerError(f"{added_json}: id of {content!r} is {i!r}, expected an integer")
            if i >= len(pieces):
                added.append(AddedToken(i, content, special=True))
    specials = _specials_from_config(config, pieces, added, where,
                                     pieces.index("<s>") if "<s>" in pieces else None, True)
    return Tokenizer(pieces, merges, added, unk_id=unk_ids[0], padded_vocab_size=padded, source=where, **specials)


def _from_gguf(path: Path) -> Tokenizer:
    from pocketlm.formats.gguf import GGUFFile

    where = str(path)
    try:
        with GGUFFile(path) as g:
            model = g.metadata_get("tokenizer.ggml.model", "string")
            if model == "gpt2":
                from pocketlm.quant.gguf_tokenizer import ByteLevelBPETokenizer
                return ByteLevelBPETokenizer.from_gguf(path)
            if model != "llama":
                raise UnsupportedTokenizerError(
                    f"{where}: tokenizer.ggml.model is {model!r}; supported: {', '.join(GGUF_TOKENIZER_MODELS)}")
            tokens = list(g.metadata_get("tokenizer.ggml.tokens", "array[string]"))
            scores = [float(s) for s in g.metadata_get("tokenizer.ggml.scores", "array[float32]")]
            types = [int(t) for t in g.metadata_get("tokenizer.ggml.token_type", ("array[int32]", "array[uint32]"))]
            ids = {name: g.metadata_get(f"tokenizer.ggml.{name}", ("uint32", "int32"), None)
                   for name in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")}
            add_bos = g.metadata_get("tokenizer.ggml.add_bos_token", "bool", True)
            arch = g.metadata_get("general.architecture", "string", "")
    except WeightFormatError as e:
        raise TokenizerError(str(e)) from None
    if not (len(tokens) == len(scores) == len(types)):
        raise TokenizerError(f"{where}: tokenizer arrays differ in length: tokens {len(tokens)}, scores "
                             f"{len(scores)}, token_type {len(types)}")
    bad = [(i, t) for i, t in enumerate(types) if t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)]
    if bad:
        raise TokenizerError(f"{where}: token {bad[0][0]} has unknown token_type {bad[0][1]}")
    for i, t in enumerate(types):
        if t == BYTE and not re.fullmatch(r"<0x[0-9A-F]{2}>", tokens[i]):
            raise TokenizerError(f"{where}: byte token {i} is {tokens[i]!r}, expected <0x00>..<0xFF>")
    for name, value in ids.items():
        if value is not None and not 0 <= value < len(tokens):
            raise TokenizerError(f"{where}: tokenizer.ggml.{name} {value} is outside the vocabulary "
                                 f"[0, {len(tokens)})")
    # The SentencePiece pieces end with the last NORMAL/BYTE token; added tokens follow, then padding rows.
    n_pieces = 1 + max((i for i, t in enumerate(types) if t in (NORMAL, BYTE)), default=-1)
    added_ids = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    size = max([n_pieces, *(i + 1 for i in added_ids)])
    stray = [i for i in range(n_pieces, size) if types[i] not in (CONTROL, USER_DEFINED)]
    if stray:
        raise TokenizerError(f"{where}: token {stray[0]} ({tokens[stray[0]]!r}) of type {types[stray[0]]} sits "
                             f"among the added tokens")
    pieces = tokens[:n_pieces]
    merges = generate_merges(pieces, scores[:n_pieces], [t == NORMAL for t in types[:n_pieces]])
    # GGUF has no strip flags; llama.cpp applies the Phi-3 rule by model, we do it by general.architecture.
    phi3 = arch == "phi3"
    added = [AddedToken(i, tokens[i], special=types[i] == CONTROL,
                        rstrip=phi3 and tokens[i] not in PHI3_NO_RSTRIP) for i in added_ids]
    unk = ids["unknown_token_id"]
    if unk is not None and unk >= n_pieces:
        raise TokenizerError(f"{where}: tokenizer.ggml.unknown_token_id {unk!r} is not a piece id")
    return Tokenizer(pieces, merges, added, bos_id=ids["bos_token_id"], eos_id=ids["eos_token_id"], unk_id=unk,
                     pad_id=ids["padding_token_id"], add_bos_default=add_bos, padded_vocab_size=len(tokens),
                     source=where)
