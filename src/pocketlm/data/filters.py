"""Heuristic quality filters: Gopher quality and repetition, C4 line rules, FineWeb rules.

Each filter is a small class whose constructor arguments are its thresholds, with the defaults of datatrove
(`datatrove/pipeline/filters/{gopher_quality,gopher_repetition,c4,fineweb_quality}_filter.py`), which implement
Rae et al. 2021 ("Gopher", appendix A), Raffel et al. 2020 ("C4", section 2.2) and Penedo et al. 2024
("FineWeb", section 3.3). `filter.check(doc)` returns `(doc, None)` to keep a document (possibly with modified
text: the C4 filter removes lines) or `(None, reason)` to drop it; a reason is "<filter>:<rule>", written next
to the rejected document so that every drop can be audited.

Gopher quality: 50 <= words <= 100,000; mean word length in [3, 10]; '#' and '...' each <= 10% of words;
<= 90% of lines start with a bullet; <= 30% of lines end with an ellipsis; >= 80% of words contain a letter;
>= 2 of the stop words (the, be, to, of, and, that, have, with).
Gopher repetition: duplicate lines <= 30% of lines and <= 20% of characters; duplicate paragraphs <= 30% / 20%;
the most frequent 2/3/4-gram covers <= 20/18/16% of characters; duplicated 5..10-grams cover
<= 15/14/13/12/11/10% of characters.
C4 (line-level, modifies text): drop lines without terminal punctuation, with < 3 words, with a word > 1000
characters, mentioning javascript or a cookie/privacy/terms policy; remove citation markers like [1]; drop the
document if it contains "lorem ipsum" or a curly bracket, or if fewer than 5 sentences remain.
FineWeb: >= 12% of lines end with punctuation; <= 67% of lines are shorter than 30 characters; characters in
duplicated lines <= 1% of all; newlines <= 0.3 per word.

Hard-wrapped text (reStructuredText, man pages, POD, plain-text manuals) breaks C4's line rules: a wrapped line
rarely ends with punctuation, so most of a good document is dropped (measured on our Debian-docs corpus: the C4
rules with defaults kept 8% of linux-doc's tokens). `C4Lines(unwrap_paragraphs=True)` first joins the lines of each
blank-line-separated paragraph, so the rules judge paragraphs; `filter_curly_bracket=False` keeps documentation
that shows code. The example corpus configuration uses both.

Deviations: words are split on whitespace and punctuation-only tokens removed (datatrove uses a language-
specific word tokenizer); no language-identification filter (our corpus is English, fastText lid weights would
have to be downloaded); C4's sentence count is the number of '. ', '? ', '! ' boundaries (datatrove uses a
sentence splitter). Code sources should not use C4 or FineWeb rules (curly brackets, short lines): the pipeline
configures filters per source.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pocketlm.data.records import DataPipelineError, Document

PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…–—“”‘’«»")
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
TERMINAL = (".", "?", "!", '"', "'", "”", "’")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENT = re.compile(r"[.!?][\"'”’]?(\s|$)")


def words_of(text: str) -> list[str]:
    return [w for w in text.split() if any(ch not in PUNCT for ch in w)]


def _dups(items: list[str]) -> tuple[int, int]:
    """(number of elements seen before, characters in them)."""
    seen, n, chars = set(), 0, 0
    for x in items:
        if x in seen:
            n, chars = n + 1, chars + len(x)
        else:
            seen.add(x)
    return n, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(" ".join(gram)) * count if count > 1 else 0


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of words covered by n-grams that occur more than once (each word counted once)."""
    first: dict[tuple[str, ...], int] = {}
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        if g in first:
            for j in range(i, i + n):
                covered[j] = True
            j0 = first[g]
            for j in range(j0, j0 + n):
                covered[j] = True
        else:
            first[g] = i
    return sum(len(w) for w, c in zip(words, covered) if c)


class Filter:
    name = "filter"

    def check(self, doc: Document) -> tuple[Document | None, str | None]:
        reason = self.reject_reason(doc.text)
        return (None, f"{self.name}:{reason}") if reason else (doc, None)

    def reject_reason(self, text: str) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass
class GopherQuality(Filter):
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    name = "gopher_quality"

    def reject_reason(self, text: str) -> str | None:
        words = words_of(text)
        n = len(words)
        if n < self.min_doc_words:
            return "short_doc"
        if n > self.max_doc_words:
            return "long_doc"
        avg = sum(len(w) for w in words) / n
        if avg < self.min_avg_word_length:
            return "below_avg_word_length"
        if avg > self.max_avg_word_length:
            return "above_avg_word_length"
        if text.count("#") / n > self.max_symbol_word_ratio:
            return "too_many_hashes"
        if (text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
            return "too_many_ellipsis"
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines:
            if sum(ln.lstrip().startswith(("•", "-", "*", "‣", "◦")) for ln in lines) / len(lines) \
                    > self.max_bullet_lines_ratio:
                return "too_many_bullets"
            if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > self.max_ellipsis_lines_ratio:
                return "too_many_end_ellipsis"
        if sum(any(c.isalpha() for c in w) for w in words) / n < self.min_alpha_words_ratio:
            return "below_alpha_threshold"
        if sum(w.lower() in STOP_WORDS for w in words) < self.min_stop_words:
            return "too_few_stop_words"
        return None


@dataclass
class GopherRepetition(Filter):
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    name = "gopher_repetition"

    def reject_reason(self, text: str) -> str | None:
        chars = len(text) or 1
        paras = [p.strip() for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
        n, c = _dups(paras)
        if paras and n / len(paras) > self.dup_para_frac:
            return "dup_para_frac"
        if c / chars > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        n, c = _dups(lines)
        if lines and n / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if c / chars > self.dup_line_char_frac:
            return "dup_line_char_frac"
        words = text.split()
        wchars = sum(len(w) for w in words) or 1
        for k, frac in self.top_n_grams:
            if _top_ngram_chars(words, k) / wchars > frac:
                return f"top_{k}_gram"
        for k, frac in self.dup_n_grams:
            if _dup_ngram_chars(words, k) / wchars > frac:
                return f"duplicated_{k}_n_grams"
        return None


@dataclass
class C4Lines(Filter):
    filter_no_terminal_punct: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000
    min_num_sentences: int = 5
    remove_citations: bool = True
    filter_javascript: bool = True
    filter_policy: bool = True
    filter_lorem_ipsum: bool = True
    filter_curly_bracket: bool = True
    unwrap_paragraphs: bool = False   # join hard-wrapped lines of a paragraph first (documentation, man pages)
    name = "c4"

    def check(self, doc: Document) -> tuple[Document | None, str | None]:
        low = doc.text.lower()
        if self.filter_lorem_ipsum and "lorem ipsum" in low:
            return None, f"{self.name}:lorem_ipsum"
        if self.filter_curly_bracket and "{" in doc.text:
            return None, f"{self.name}:curly_bracket"
        kept, dropped = [], Counter()
        lines = doc.text.splitlines()
        if self.unwrap_paragraphs:
            lines = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc.text)]
        for line in lines:
            line = line.strip()
            if not line:
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            words = line.split()
            lw = line.lower()
            if self.filter_no_terminal_punct and (not line.endswith(TERMINAL) or line.endswith("...")):
                dropped["no_terminal_punct"] += 1
            elif len(words) < self.min_words_per_line:
                dropped["too_few_words"] += 1
            elif any(len(w) > self.max_word_length for w in words):
                dropped["long_word"] += 1
            elif self.filter_javascript and "javascript" in lw:
                dropped["javascript"] += 1
            elif self.filter_policy and any(p in lw for p in _POLICY):
                dropped["policy"] += 1
            else:
                kept.append(line)
        text = "\n".join(kept)
        if len(_SENT.findall(text)) < self.min_num_sentences:
            return None, f"{self.name}:too_few_sentences"
        meta = dict(doc.metadata)
        if dropped:
            meta["c4_lines_dropped"] = dict(sorted(dropped.items()))
        return Document(doc.id, text, meta), None


@dataclass
class FineWebQuality(Filter):
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    name = "fineweb"

    def reject_reason(self, text: str) -> str | None:
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if not lines:
            return "empty"
        if sum(ln.endswith(TERMINAL) for ln in lines) / len(lines) < self.line_punct_thr:
            return "line_punct_ratio"
        if sum(len(ln) <= self.short_line_length for ln in lines) / len(lines) > self.short_line_thr:
            return "short_line_ratio"
        _, dup_chars = _dups(lines)
        if dup_chars / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(1, len(text.split())) > self.new_line_ratio:
            return "list_ratio"
        return None


FILTERS: dict[str, type[Filter]] = {"gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition,
                                    "c4": C4Lines, "fineweb": FineWebQuality}
DEFAULT_ORDER = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


def build_filters(spec: dict[str, Any] | list | None = None) -> list[Filter]:
    """Filters from a spec: {name: {threshold overrides} | true | false}; None gives all four with defaults.

    Order is always DEFAULT_ORDER (repetition first, as FineWeb), whatever the order of the spec's keys."""
    if spec is None:
        spec = {name: {} for name in DEFAULT_ORDER}
    if isinstance(spec, list):
        spec = {name: {} for name in spec}
    unknown = set(spec) - set(FILTERS)
    if unknown:
        raise DataPipelineError(f"unknown filters {sorted(unknown)}; known: {sorted(FILTERS)}")
    out = []
    for name in DEFAULT_ORDER:
        opts = spec.get(name, False)
        if opts is False or opts is None:
            continue
        opts = {} if opts is True else dict(opts)
        try:
            for k in ("top_n_grams", "dup_n_grams"):
                if k in opts:
                    opts[k] = tuple(tuple(x) for x in opts[k])
            out.append(FILTERS[name](**opts))
        except TypeError as e:
            raise DataPipelineError(f"filter {name}: bad option ({e}); options: "
                                    f"{list(FILTERS[name].__dataclass_fields__)}") from None
    return out


def apply_filters(doc: Document, filters: list[Filter]) -> tuple[Document | None, str | None]:
    for f in filters:
        doc2, reason = f.check(doc)
        if doc2 is None:
            return None, reason
        doc = doc2
    return doc, None
