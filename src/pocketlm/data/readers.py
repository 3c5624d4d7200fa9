"""Readers: corpus files -> `Document`s with stable ids and source metadata.

Formats: JSONL (`.jsonl`, `.jsonl.gz`; a `text` field, optional `id` and `metadata`, other fields are kept as
metadata), Parquet (`.parquet`, read in record batches with pyarrow; a `text` column), plain-text folders
(`.txt`, `.md`, `.rst`, `.pod`, `.py`, ...: one file = one document) and HTML (`.html`, `.htm`: main text
extracted with trafilatura, the extractor FineWeb and datatrove use; boilerplate such as navigation is dropped).
A document's id is the record's own `id` when it has one, else `<source>/<relative path>[:<line or row>]`, so
ids do not depend on the machine or the order of a directory listing (folders are walked in sorted order). The
same rule serves `pocketlm data run` and `pocketlm data score` (whose source name is the file's stem).

Nothing is dropped here: a record without text (a Parquet null) becomes a document with empty text and
metadata["text_missing"], and an HTML page without main text one with empty text, so that the pipeline's read
stage can audit them (rejects/read/, reason "read:no_text", "read:no_extracted_text", "read:empty",
"read:whitespace_only").
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterator

from pocketlm.data.records import DataPipelineError, Document

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".pod", ".py", ".rs", ".c", ".h", ".sql", ".tex", ".adoc")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")


def jsonl_chunks(path: Path, lines_per_chunk: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, first line number) chunks of an uncompressed JSONL file, so that one big file can
    be read by several workers."""
    chunks, start, line_no, count, pos = [], 0, 1, 0, 0
    with open(path, "rb") as f:
        for line in f:
            pos += len(line)
            count += 1
            if count == lines_per_chunk:
                chunks.append((start, pos, line_no))
                start, line_no, count = pos, line_no + count, 0
    if count or not chunks:
        chunks.append((start, pos, line_no))
    return chunks


def read_jsonl(path: Path, source: str, rel: str, span: tuple[int, int, int] | None = None) -> Iterator[Document]:
    """Documents of a JSONL file (or of the byte span (start, end, first line number) of one)."""
    if span is not None:
        start, end, first = span
        with open(path, "rb") as fb:
            fb.seek(start)
            lines = [x.decode("utf-8") for x in fb.read(end - start).split(b"\n")]  # "\n" only, like the file
    else:
        first = 1
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", newline="\n") as f:
            lines = f.read().split("\n")
    for n, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataPipelineError(f"{path} line {n}: invalid JSON ({e}); expected one object with a "
                                    "'text' field per line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DataPipelineError(f"{path} line {n}: no string 'text' field")
        meta = dict(rec.get("metadata") or {})
        meta.update({k: v for k, v in rec.items() if k not in ("id", "text", "metadata")})
        meta.setdefault("source", source)
        yield Document(str(rec.get("id", f"{source}/{rel}:{n}")), rec["text"], meta)


def read_parquet(path: Path, source: str, rel: str, batch_size: int = 1024) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataPipelineError(f"{path}: not a readable Parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataPipelineError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for rec in batch.to_pylist():
            row += 1
            text = rec.pop("text")
            rid = rec.pop("id", None)
            meta = {k: v for k, v in rec.items() if isinstance(v, (str, int, float, bool)) or v is None}
            meta.setdefault("source", source)
            if not isinstance(text, str):   # a null (or non-string) text: kept as an empty document to be audited
                meta["text_missing"] = True
                text = ""
            yield Document(str(rid if rid is not None else f"{source}/{rel}:{row}"), text, meta)


def html_to_text(html: str) -> str:
    """Main text of an HTML page (trafilatura, tables and comments off); '' when nothing is extracted."""
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=False, favor_recall=True,
                               deduplicate=False) or ""


def read_file(path: Path, source: str, rel: str) -> Iterator[Document]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from read_jsonl(path, source, rel)
    elif name.endswith(".parquet"):
        yield from read_parquet(path, source, rel)
    elif name.endswith(HTML_SUFFIXES):
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        yield Document(f"{source}/{rel}", text, {"source": source, "path": rel, "format": "html"})
    elif name.endswith(TEXT_SUFFIXES):
        yield Document(f"{source}/{rel}", path.read_text(encoding="utf-8", errors="replace"),
                       {"source": source, "path": rel})
    else:
        raise DataPipelineError(f"{path}: unknown corpus file type; expected .jsonl(.gz), .parquet, "
                                f"{'/'.join(HTML_SUFFIXES)} or {'/'.join(TEXT_SUFFIXES)}")


def list_files(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """(file, path relative to root) for a file or every known corpus file under a folder, sorted."""
    root = Path(root)
    if not root.exists():
        raise DataPipelineError(f"{root}: corpus path not found")
    if root.is_file():
        return [(root, root.name)]
    known = (".jsonl", ".jsonl.gz", ".parquet") + HTML_SUFFIXES + TEXT_SUFFIXES
    return [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name.lower().endswith(known)]


def read_documents(root: str | os.PathLike, source: str | None = None) -> Iterator[Document]:
    """Every document under `root` (a file or a folder), in a stable order. `source` (default: the file's name
    without its suffixes, or the folder's name) prefixes the ids of records without an `id`."""
    source = source or (Path(root).name.split(".")[0] if Path(root).is_file() else Path(root).name)
    for path, rel in list_files(root):
        yield from read_file(path, source, rel)
