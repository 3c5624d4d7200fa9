"""Decontamination: drop training documents that share a 13-gram with an evaluation item.

Reuses the evaluation side's definitions (`pocketlm.eval.contamination`: `words` lower-cases, strips punctuation
and splits on whitespace; `ngrams`; `item_text` takes an item's question, not its options), so a corpus this
stage has cleaned reports 0 contaminated items in `pocketlm eval contamination`. The direction differs: the
eval side asks "which benchmark items occur in the corpus", this stage asks "which training documents contain
any benchmark n-gram" and drops those with reason "decontam:<task>:<item id>". Items shorter than n words are
matched by their whole word sequence (as the eval side), but only when they have at least `min_short_words` (8)
words: shorter ones ("What is 2+2?") would drop innocent text.

Items come from the eval registry (`--eval-data DIR --tasks all`, loaded through `pocketlm.eval.runner.load_docs`)
or from JSONL files with a `text` field (`--decontam-items FILE`). The index is a set of joined n-gram strings
(stable across processes, unlike Python's salted `hash`), saved as JSON so pipeline workers load it once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pocketlm.data.records import DataPipelineError, Document
from pocketlm.eval.contamination import item_text, ngrams, words


class DecontamIndex:
    def __init__(self, n: int = 13, min_short_words: int = 8):
        self.n, self.min_short_words = n, min_short_words
        self.grams: dict[str, str] = {}    # "w1 w2 ... wn" -> "task:item"
        self.short: dict[str, str] = {}    # whole short item -> "task:item"
        self.items = 0

    def add(self, key: str, text: str) -> None:
        ws = words(text)
        self.items += 1
        if len(ws) >= self.n:
            for g in ngrams(ws, self.n):
                self.grams.setdefault(" ".join(g), key)
        elif len(ws) >= self.min_short_words:
            self.short.setdefault(" ".join(ws), key)

    def add_eval_tasks(self, tasks: str, data_dir: str | os.PathLike | None) -> None:
        from pocketlm.eval.runner import load_docs
        from pocketlm.eval.tasks import resolve_tasks

        for task in resolve_tasks(tasks):
            for d in load_docs(task, Path(data_dir) if data_dir else None)[0]:
                self.add(f"{task.name}:{d.id}", item_text(d))

    def add_jsonl(self, path: str | os.PathLike) -> None:
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataPipelineError(f"{path} line {n}: invalid JSON ({e})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise DataPipelineError(f"{path} line {n}: an evaluation item needs a string 'text'")
                    self.add(f"{rec.get('task', path.stem)}:{rec.get('id', n)}", rec["text"])

    def match(self, text: str) -> str | None:
        ws = words(text)
        for g in ngrams(ws, self.n):
            hit = self.grams.get(" ".join(g))
            if hit:
                return hit
        for k in sorted({item.count(" ") + 1 for item in self.short}):
            for g in ngrams(ws, k):
                hit = self.short.get(" ".join(g))
                if hit:
                    return hit
        return None

    def check(self, doc: Document) -> tuple[Document | None, str | None]:
        hit = self.match(doc.text)
        return (None, f"decontam:{hit}") if hit else (doc, None)

    def to_json(self) -> str:
        return json.dumps({"n": self.n, "min_short_words": self.min_short_words, "items": self.items,
                           "grams": self.grams, "short": self.short}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecontamIndex:
        d = json.loads(text)
        idx = cls(d["n"], d["min_short_words"])
        idx.grams, idx.short, idx.items = d["grams"], d["short"], d["items"]
        return idx
