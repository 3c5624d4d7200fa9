"""Knowledge-vs-reasoning filter: demote passages dominated by ephemeral facts.

Phi-3's report (section 2, "data optimal regime") removes web data such as "the result of a game in premier
league in a particular day" so that a small model's capacity goes to reasoning rather than trivia. This module
scores a passage by how much of it is ephemeral fact relative to explanation:

- ephemeral hits E, counted with regular expressions: dates (month-name dates, ISO dates, weekday names),
  years 1800-2099, clock times, scores ("3-1", "2:0", "won 24 to 17"), prices and money ($, €, £, "dollars"),
  percentages, other bare numbers (weight 0.5), runs of capitalised words that are not sentence starts (names,
  weight 0.5 per run) and name-list lines (a line that is mostly capitalised words separated by commas);
- explanatory hits X: connectives and phrases of reasoning and teaching ("because", "therefore", "so that",
  "which means", "for example", "in other words", "if ... then", "we can", "suppose", "consider", "is defined
  as", "the reason", "this is why", "hence", "thus", "i.e.", "e.g.", "how to", "step", ...).

With W words, e = 100 E / W and x = 100 X / W (hits per 100 words), the **ephemeral score** is
`s = e / (e + 3 x + 1)` in [0, 1). A passage is demoted when `s >= threshold` (default 0.6) and `e >= min_density`
(default 4 hits per 100 words): a sports results page scores about 0.9, a textbook paragraph below 0.3, an
explanatory passage that happens to cite many years stays low because its x is high. "Demote" means the
document is tagged (`metadata["knowledge"]`) and left out of the phase-2 (reasoning-heavy) mixture; with
`action="drop"` it is dropped with reason "knowledge:ephemeral". Deviation: Phi-3's actual filter (an LLM-based
classifier, unpublished) is not known; this is a transparent heuristic stand-in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pocketlm.data.records import Document

_MONTH = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|" \
         r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
_PATTERNS = [
    (re.compile(rf"\b{_MONTH}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b|\b\d{{1,2}}(?:st|nd|rd|th)? {_MONTH}\.?,? "
                rf"\d{{4}}\b", re.I), 1.0, "date"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b"), 1.0, "date"),
    (re.compile(r"\b(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b", re.I), 1.0, "date"),
    (re.compile(r"\b(?:18|19|20)\d{2}\b"), 1.0, "year"),
    (re.compile(r"\b\d{1,2}:\d{2}(?:\s?[ap]\.?m\.?)?\b", re.I), 1.0, "time"),
    (re.compile(r"\b\d{1,3}\s?[-–]\s?\d{1,3}\b(?!\s?(?:\d|%))|\b(?:won|lost|beat|drew|defeated)\b[^.\n]{0,30}?"
                r"\b\d+\b", re.I), 1.0, "score"),
    (re.compile(r"[$€£¥]\s?\d[\d,.]*|\b\d[\d,.]*\s?(?:dollars|euros|pounds|usd|eur|gbp|cents)\b", re.I), 1.0, "price"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?%"), 1.0, "percent"),
    (re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\b"), 0.5, "number"),
]
_NAME_RUN = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+\b", re.M)
_NAME_LIST_LINE = re.compile(r"^\s*(?:[A-Z][\w.'-]*(?:\s+[A-Z][\w.'-]*)*\s*[,;]\s*){2,}[A-Z][\w.'-]*.*$", re.M)
_EXPLAIN = re.compile(
    r"\b(?:because|therefore|thus|hence|so that|which means|this means|that means|for example|for instance|"
    r"in other words|suppose|consider|imagine|we can|you can|we get|we have|notice that|note that|"
    r"is defined as|defined as|means that|the reason|this is why|that is why|as a result|in order to|"
    r"it follows|if\b[^.\n]{1,80}\bthen|how to|step|first,|second,|finally,|explain|why|"
    r"in general|in contrast|however|although|instead|depends on|causes?|leads? to|allows?|i\.e\.|e\.g\.)",
    re.I)


@dataclass
class KnowledgeScore:
    ephemeral: float
    explanatory: float
    words: int
    score: float
    kinds: dict

    def as_dict(self) -> dict:
        return {"score": round(self.score, 4), "ephemeral_per_100w": round(self.ephemeral, 3),
                "explanatory_per_100w": round(self.explanatory, 3), "words": self.words, "kinds": self.kinds}


def score_text(text: str) -> KnowledgeScore:
    words = max(1, len(text.split()))
    kinds: dict[str, float] = {}
    e = 0.0
    covered = bytearray(len(text) + 1)   # one hit per span ("May 3, 2021" is not also a year)
    for pat, weight, kind in _PATTERNS:
        for m in pat.finditer(text):
            if covered[m.start()]:
                continue
            covered[m.start():m.end()] = b"\x01" * (m.end() - m.start())
            e += weight
            kinds[kind] = kinds.get(kind, 0) + weight
    names = len(_NAME_RUN.findall(text)) * 0.5 + len(_NAME_LIST_LINE.findall(text)) * 2.0
    if names:
        kinds["names"] = names
    e += names
    x = float(len(_EXPLAIN.findall(text)))
    ed, xd = 100 * e / words, 100 * x / words
    return KnowledgeScore(ed, xd, words, ed / (ed + 3 * xd + 1), kinds)


@dataclass
class KnowledgeFilter:
    threshold: float = 0.6
    min_density: float = 4.0
    action: str = "tag"   # "tag": keep, mark metadata["knowledge"]["demoted"]; "drop": drop with a reason

    def check(self, doc: Document) -> tuple[Document | None, str | None]:
        ks = score_text(doc.text)
        demoted = ks.score >= self.threshold and ks.ephemeral >= self.min_density
        if demoted and self.action == "drop":
            return None, f"knowledge:ephemeral:{ks.score:.2f}"
        meta = dict(doc.metadata)
        meta["knowledge"] = {**ks.as_dict(), "demoted": demoted}
        return Document(doc.id, doc.text, meta), None
