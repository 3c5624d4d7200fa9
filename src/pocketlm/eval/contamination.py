"""Benchmark contamination: 13-gram overlap between a training corpus and benchmark items.

As GPT-3 (Brown et al. 2020, appendix C) and the lm-evaluation-harness decontamination tool: text is
lower-cased, punctuation removed and split on whitespace into words; an item is contaminated when any of its
13-grams occurs in the corpus. Items shorter than 13 words are matched as a whole (their full word sequence
must occur in the corpus), a deviation from GPT-3, which skipped them (fewer false negatives on short
questions). An item's text is its question (lm-eval's decontamination query), without options or answers.

Corpus files: `.txt` (the whole file is one document), `.jsonl`/`.jsonl.gz` (the `text` field of each line),
`.parquet` (the `text` column); folders are searched recursively for those suffixes.
"""

from __future__ import annotations

import gzip
import json
import re
import string
from pathlib import Path
from typing import Iterable, Iterator

from pocketlm.eval.data import EvalDataError, read_parquet
from pocketlm.eval.tasks import Doc, Task

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def words(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def ngrams(ws: list[str], n: int) -> Iterator[tuple[str, ...]]:
    for i in range(len(ws) - n + 1):
        yield tuple(ws[i:i + n])


def item_text(doc: Doc) -> str:
    """The decontamination query (lm-eval's `doc_to_decontamination_query`): the question, not the options."""
    if doc.extra.get("prompt"):
        return doc.extra["prompt"]
    return doc.question or doc.text


def corpus_documents(paths: Iterable[Path]) -> Iterator[tuple[str, str]]:
    """(source, text) for every document of the corpus."""
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise EvalDataError(f"{root}: corpus file or folder not found; expected .txt, .jsonl(.gz) with a "
                                f"'text' field, or .parquet with a 'text' column")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            name = f.name
            if name.endswith(".txt"):
                yield str(f), f.read_text(encoding="utf-8", errors="replace")
            elif name.endswith((".jsonl", ".jsonl.gz")):
                opener = gzip.open if name.endswith(".gz") else open
                with opener(f, "rt", encoding="utf-8") as fh:
                    for n, line in enumerate(fh, 1):
                        if line.strip():
                            try:
                                rec = json.loads(line)
                            except json.JSONDecodeError:
                                raise EvalDataError(f"{f} line {n}: not valid JSON; expected one object with a "
                                                    "'text' field per line") from None
                            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                                yield f"{f}:{n}", rec["text"]
            elif name.endswith(".parquet"):
                for n, rec in enumerate(read_parquet(f, "a table with a 'text' column"), 1):
                    if isinstance(rec.get("text"), str):
                        yield f"{f}:{n}", rec["text"]


def check(tasks_docs: dict[str, list[Doc]], corpus: Iterable[Path], *, n: int = 13, examples: int = 5) -> dict:
    """Per task: items, contaminated items, their fraction and a few examples (item id, matched n-gram, source)."""
    index: dict[tuple[str, ...], list[tuple[str, str]]] = {}  # n-gram -> [(task, item id)]
    short: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for task, docs in tasks_docs.items():
        for d in docs:
            ws = words(item_text(d))
            target = index if len(ws) >= n else short
            grams = ngrams(ws, n) if len(ws) >= n else [tuple(ws)] if ws else []
            for g in grams:
                target.setdefault(g, []).append((task, d.id))
    hits: dict[tuple[str, str], tuple[str, str]] = {}
    short_lens = sorted({len(g) for g in short})
    for source, text in corpus_documents(corpus):
        ws = words(text)
        for g in ngrams(ws, n):
            for key in index.get(g, ()):
                hits.setdefault(key, (" ".join(g), source))
        for k in short_lens:
            for g in ngrams(ws, k):
                for key in short.get(g, ()):
                    hits.setdefault(key, (" ".join(g), source))
    report = {}
    for task, docs in tasks_docs.items():
        bad = [(d.id, *hits[(task, d.id)]) for d in docs if (task, d.id) in hits]
        report[task] = {"items": len(docs), "contaminated": len(bad),
                        "fraction": len(bad) / len(docs) if docs else 0.0,
                        "examples": [{"id": i, "ngram": g, "source": s} for i, g, s in bad[:examples]]}
    return {"n": n, "tasks": report}


def task_docs(tasks: list[Task], load) -> dict[str, list[Doc]]:
    return {t.name: load(t)[0] for t in tasks}
