"""The document record every data stage reads and writes, and its JSONL part files.

A `Document` is (id, text, metadata). Stages may change `text` (the C4 line filter removes lines) and add keys
to `metadata` (scores, token counts) but never drop keys or change the id, so a document can be traced from its
source file to the token shards. Part files are JSONL, one document per line, keys in a fixed order, so the same
documents always serialise to the same bytes; they are written whole and atomically (`pocketlm.fsutil`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pocketlm.errors import PocketLMError
from pocketlm.fsutil import atomic_write_bytes


class DataPipelineError(PocketLMError, ValueError):
    """Bad pipeline input: an unreadable corpus file, a malformed record, a bad configuration value."""


@dataclass
class Document:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "text": self.text, "metadata": self.metadata},
                          ensure_ascii=False, sort_keys=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, rec: dict, where: str = "") -> Document:
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or "id" not in rec:
            raise DataPipelineError(f"{where}: a document needs a string 'text' and an 'id'; got keys "
                                    f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
        meta = rec.get("metadata") or {}
        if not isinstance(meta, dict):
            raise DataPipelineError(f"{where}: 'metadata' must be an object, got {type(meta).__name__}")
        return cls(str(rec["id"]), rec["text"], dict(meta))


def iter_jsonl(path: str | os.PathLike, *, error: type[Exception] = DataPipelineError,
               torn_tail: bool = False) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a JSONL file; bad JSON raises `error` naming the file
    and line. `torn_tail`: a last line without its newline that is not valid JSON ends the file instead (a
    writer still appending; a resumable writer redoes it)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if torn_tail and not line.endswith("\n"):
                    return
                raise error(f"{path} line {n}: invalid JSON ({e})") from None
            yield n, rec


def read_records(path: str | os.PathLike, keys: tuple[str, ...] = (), *,
                 error: type[Exception] = DataPipelineError) -> list[dict]:
    """The objects of a JSONL file that a generator may still be appending to (`pocketlm data teacher`): blank
    lines are skipped and a torn last line (no newline yet) ends the file; any other bad line, or an object without
    one of `keys`, raises `error` naming the file and line."""
    out = []
    for n, rec in iter_jsonl(path, error=error, torn_tail=True):
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            raise error(f"{path}:{n}: expected an object" + (f" with {', '.join(keys)}" if keys else ""))
        out.append(rec)
    return out


def read_part(path: str | os.PathLike) -> Iterator[Document]:
    """Documents of a part file written by `write_part`."""
    for n, rec in iter_jsonl(path):
        yield Document.from_dict(rec, f"{path} line {n}")


def encode_part(docs: Iterable[Document]) -> bytes:
    return "".join(d.to_json() + "\n" for d in docs).encode("utf-8")


def write_part(path: str | os.PathLike, docs: Iterable[Document]) -> int:
    """Write documents to `path` atomically; returns how many."""
    docs = list(docs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_part(docs))
    return len(docs)
