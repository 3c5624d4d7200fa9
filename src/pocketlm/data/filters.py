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
<= 15/14/13/12/11/10% of characters; counted exactly as datatrove counts them (see `GopherRepetition`).
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

Deviations: words are split on whitespace (Gopher quality also removes punctuation-only tokens; datatrove uses a
language-specific word tokenizer, which `GopherRepetition(word_splitter="spacy")` reproduces exactly); no
language-identification filter (our corpus is English, fastText lid weights would have to be downloaded); C4's
sentence count is the number of '. ', '? ', '! ' boundaries (datatrove uses a sentence splitter). Code sources
should not use C4 or FineWeb rules (curly brackets, short lines): the pipeline configures filters per source.
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
    """(number of elements seen before, characters in them); first occurrences are not counted."""
    seen, n, chars = set(), 0, 0
    for x in items:
        if x in seen:
            n, chars = n + 1, chars + len(x)
        else:
            seen.add(x)
    return n, chars


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of repeated n-grams (datatrove's `find_all_duplicate`): scan left to right; an n-gram (words
    joined without spaces) seen before adds its characters and the scan jumps past it, else it moves one word."""
    seen: set[str] = set()
    chars, i = 0, 0
    while i < len(words) - n + 1:
        gram = "".join(words[i:i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def _spacy_words(text: str) -> list[str]:
    """datatrove's English word tokenizer: spaCy's blank English pipeline, tokens stripped, empty ones dropped."""
    nlp = _SPACY.get("en")
    if nlp is None:
        try:
            import spacy
        except ImportError:
            raise DataPipelineError("gopher_repetition word_splitter 'spacy' needs the spacy package "
                                    "(pip install spacy; no model download)") from None
        nlp = _SPACY["en"] = spacy.blank("en")
    nlp.max_length = len(text) + 10
    try:
        tokens = [t.text for t in nlp.make_doc(text)]
    except Exception:  # spaCy fails on the literal string "IS_ALPHA"; datatrove retries without it
        if "IS_ALPHA" not in text:
            raise
        tokens = [t.text for t in nlp.make_doc(text.replace("IS_ALPHA", ""))]
    return [t.strip() for t in tokens if t.strip()]


_SPACY: dict = {}
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
WORD_SPLITTERS = {"whitespace": str.split, "spacy": _spacy_words}


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
    """Gopher's repetition rules with datatrove's exact definitions (`GopherRepetitionFilter`, datatrove 0.10).

    Paragraphs: `text.strip()` split on runs of >= 2 newlines; lines: `text` split on runs of newlines (neither is
    stripped or filtered). Duplicates are the elements seen before (the first occurrence is not counted), and every
    character fraction divides by `len(text)`. Top n-gram: the most frequent n-gram (joined with spaces) times its
    count, even when it occurs once, ties going to the first seen. Duplicated n-grams: a left-to-right scan that,
    on an n-gram (joined without spaces) seen before, counts its characters and jumps n words ahead. A threshold of
    0 or None disables its rule, as in datatrove. An empty text is rejected ("empty").

    Words (`word_splitter`): "whitespace" (default; `str.split`) or "spacy", the tokenizer datatrove uses for
    English (`spacy.blank("en")`, tokens stripped, empty ones dropped; needs the `spacy` package, no model
    download). tests/test_data_filters.py checks both against datatrove's own filter, decisions and ratios.
    """
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    word_splitter: str = "whitespace"
    name = "gopher_repetition"

    def __post_init__(self):
        if self.word_splitter not in WORD_SPLITTERS:
            raise DataPipelineError(f"gopher_repetition word_splitter {self.word_splitter!r}: use one of "
                                    f"{sorted(WORD_SPLITTERS)}")

    def _rules(self, text: str):
        """(rule, ratio, threshold) in datatrove's order, computed lazily so a rejection stops early."""
        paragraphs = _PARAGRAPHS.split(text.strip())
        n, chars = _dups(paragraphs)
        yield "dup_para_frac", n / len(paragraphs), self.dup_para_frac
        yield "dup_para_char_frac", chars / len(text), self.dup_para_char_frac
        lines = _LINES.split(text)
        n, chars = _dups(lines)
        yield "dup_line_frac", n / len(lines), self.dup_line_frac
        yield "dup_line_char_frac", chars / len(text), self.dup_line_char_frac
        words = WORD_SPLITTERS[self.word_splitter](text)
        for k, frac in self.top_n_grams:
            grams = [" ".join(words[i:i + k]) for i in range(len(words) - k + 1)]
            if grams:
                gram, count = Counter(grams).most_common(1)[0]
                yield f"top_{k}_gram", len(gram) * count / len(text), frac
        for k, frac in self.dup_n_grams:
            yield f"duplicated_{k}_n_grams", _dup_ngram_chars(words, k) / len(text), frac

    def ratios(self, text: str) -> dict[str, float]:
        """Every rule's ratio (for audits and the comparison with datatrove); {} for an empty text."""
        return {rule: ratio for rule, ratio, _ in self._rules(text)} if text else {}

    def reject_reason(self, text: str) -> str | None:
        if not text:
            return "empty"
        for rule, ratio, threshold in self._rules(text):
            if threshold and ratio > threshold:
                return rule
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
