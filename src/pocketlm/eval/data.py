"""Readers for each benchmark's published file layout, and the error a user sees when a file is missing or wrong.

Every reader takes the folder that holds that benchmark's files exactly as they are downloaded (see the
`LAYOUTS` strings, which are also printed in errors) and returns plain dicts. Nothing is fetched from the network.
Generic record readers: `.jsonl` (one JSON object per line), `.json` (a list, or an object holding one),
`.csv` (with or without a header), `.parquet` (via pyarrow, imported only when a Parquet file is read), and
gzip-compressed `.jsonl.gz`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pocketlm.errors import PocketLMError


class EvalDataError(PocketLMError, ValueError):
    """A benchmark data file is missing or does not have the benchmark's published layout."""


def missing(path: Path, layout: str) -> EvalDataError:
    return EvalDataError(f"{path}: file not found; expected layout: {layout}")


def malformed(path: Path, where: str, problem: str, layout: str) -> EvalDataError:
    return EvalDataError(f"{path}{where}: {problem}; expected layout: {layout}")


def find(root: Path, candidates: Iterable[str], layout: str) -> Path:
    """The first of `candidates` (paths relative to `root`) that exists, else an error naming the first."""
    candidates = list(candidates)
    for c in candidates:
        if (root / c).is_file():
            return root / c
    raise missing(root / candidates[0], layout)


def read_jsonl(path: Path, layout: str) -> list[dict]:
    if not path.is_file():
        raise missing(path, layout)
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise malformed(path, f" line {n}", f"not valid JSON ({e.msg})", layout) from None
                if not isinstance(obj, dict):
                    raise malformed(path, f" line {n}", f"expected a JSON object, got {type(obj).__name__}", layout)
                out.append(obj)
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise malformed(path, "", f"unreadable ({e})", layout) from None
    return out


def read_json(path: Path, layout: str) -> Any:
    if not path.is_file():
        raise missing(path, layout)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise malformed(path, "", f"not valid JSON ({e})", layout) from None


def read_csv(path: Path, layout: str, *, header: bool) -> list[dict] | list[list[str]]:
    if not path.is_file():
        raise missing(path, layout)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise malformed(path, "", f"not UTF-8 text ({e})", layout) from None
    try:
        if header:
            return list(csv.DictReader(io.StringIO(text)))
        return [row for row in csv.reader(io.StringIO(text)) if row]
    except csv.Error as e:
        raise malformed(path, "", f"not valid CSV ({e})", layout) from None


def read_parquet(path: Path, layout: str) -> list[dict]:
    if not path.is_file():
        raise missing(path, layout)
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the environment
        raise EvalDataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise malformed(path, "", f"not a readable Parquet file ({e})", layout) from None


def read_records(path: Path, layout: str) -> list[dict]:
    """Records from .jsonl/.jsonl.gz/.json/.parquet/.csv (header row) by suffix."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path, layout)
    if name.endswith(".parquet"):
        return read_parquet(path, layout)
    if name.endswith(".csv"):
        return read_csv(path, layout, header=True)
    if name.endswith(".json"):
        obj = read_json(path, layout)
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) == 1:
                obj = lists[0]
        if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
            raise malformed(path, "", "expected a list of JSON objects", layout)
        return obj
    raise malformed(path, "", "unknown file type (expected .jsonl, .json, .csv or .parquet)", layout)


def field(rec: dict, key: str, path: Path, n: int, layout: str, types: type | tuple = object) -> Any:
    """rec[key], type-checked, or an error naming the file, the record and the missing field."""
    if key not in rec:
        raise malformed(path, f" record {n}", f"missing field {key!r} (has {sorted(rec)[:8]})", layout)
    value = rec[key]
    if not isinstance(value, types):
        raise malformed(path, f" record {n}", f"field {key!r} is {type(value).__name__} {value!r:.60}", layout)
    return value


def read_labels(path: Path, layout: str, count: int) -> list[int]:
    """A `*-labels.lst` file (PIQA, SocialIQA): one integer per line, as many as there are records."""
    if not path.is_file():
        raise missing(path, layout)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    try:
        labels = [int(x) for x in lines]
    except ValueError:
        raise malformed(path, "", "every line must be an integer label", layout) from None
    if len(labels) != count:
        raise malformed(path, "", f"{len(labels)} labels for {count} records", layout)
    return labels


class LazyDocs(Sequence):
    """A few-shot pool read on first use: a 0-shot run never opens the train split (its errors surface when,
    and only when, shots are drawn)."""

    def __init__(self, read: Callable[[], list]):
        self._read, self._docs = read, None

    def _get(self) -> list:
        if self._docs is None:
            self._docs = list(self._read())
        return self._docs

    def __len__(self) -> int:
        return len(self._get())

    def __getitem__(self, i):
        return self._get()[i]

    def __iter__(self):
        return iter(self._get())
