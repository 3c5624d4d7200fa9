"""Filters, dedup, knowledge scoring, decontamination and readers on documents whose right answer is known."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import SPORTS, prose  # noqa: E402

from pocketlm.data.decontam import DecontamIndex  # noqa: E402
from pocketlm.data.dedup import DedupConfig, Deduplicator  # noqa: E402
from pocketlm.data.filters import (C4Lines, FineWebQuality, GopherQuality, GopherRepetition,  # noqa: E402
                                   apply_filters, build_filters)
from pocketlm.data.knowledge import KnowledgeFilter, score_text  # noqa: E402
from pocketlm.data.records import DataPipelineError, Document  # noqa: E402

GOOD = prose(7)


def doc(text, i="d"):
    return Document(i, text, {"source": "t"})


@pytest.mark.parametrize("text,reason", [
    ("only a few words here, the end.", "short_doc"),
    (" ".join(["antidisestablishmentarianism"] * 30 + ["the", "of"] * 15), "above_avg_word_length"),
    (" ".join(["a", "b", "c", "the", "of"] * 20), "below_avg_word_length"),
    (GOOD + " #tag" * 60, "too_many_hashes"),
    (GOOD + " ..." * 60, "too_many_ellipsis"),
    ("\n".join("- " + " ".join(GOOD.split()[i:i + 6]) for i in range(0, 150, 6)), "too_many_bullets"),
    ("\n".join(" ".join(GOOD.split()[i:i + 12]) + "..." for i in range(0, 150, 12)), "too_many_end_ellipsis"),
    (" ".join(["123", "456", "the", "of", "word"] * 20), "below_alpha_threshold"),
    (" ".join(w for w in GOOD.split() if w.lower().strip(".") not in {"the", "be", "to", "of", "and", "that",
                                                                      "have", "with"}), "too_few_stop_words"),
])
def test_gopher_quality_rules(text, reason):
    assert GopherQuality().reject_reason(text) == reason
    assert GopherQuality().reject_reason(GOOD) is None


def test_gopher_repetition_rules():
    f = GopherRepetition()
    assert f.reject_reason(GOOD) is None
    assert f.reject_reason("\n\n".join(["The same paragraph with the same words in it."] * 5 + [GOOD])) \
        == "dup_para_frac"
    lines = GOOD.split("\n")
    assert f.reject_reason("\n".join(lines + [lines[0]] * 4)) in ("dup_line_frac", "dup_line_char_frac")
    assert f.reject_reason(GOOD + " " + " ".join(["buy now"] * 80)) == "top_2_gram"
    words = GOOD.split()
    assert f.reject_reason(" ".join(words[:40] * 2 + words[40:60])).startswith("duplicated_")
    assert GopherRepetition(top_n_grams=((2, 0.99),)).reject_reason(GOOD + " " + " ".join(["buy now"] * 80)) != \
        "top_2_gram"   # thresholds are configurable


def test_c4_lines():
    f = C4Lines()
    text = GOOD + "\nMenu Home About\nThis site uses cookies to improve your experience, we promise.\n" \
                  "Please enable javascript to see the page properly today.\nSee [1] the notes here.[2]"
    d, reason = f.check(doc(text))
    assert reason is None
    assert "Menu Home" not in d.text and "cookies" not in d.text and "javascript" not in d.text
    assert "See  the notes here." in d.text
    assert d.metadata["c4_lines_dropped"] == {"javascript": 1, "no_terminal_punct": 1, "policy": 1}
    assert f.check(doc(GOOD + "\nlorem ipsum dolor sit amet."))[1] == "c4:lorem_ipsum"
    assert f.check(doc(GOOD + "\nint main() { return 0; }"))[1] == "c4:curly_bracket"
    assert f.check(doc("One sentence only. Two."))[1] == "c4:too_few_sentences"
    assert C4Lines(filter_curly_bracket=False).check(doc(GOOD + "\nuse {x} here."))[1] is None
    wrapped = "\n\n".join("\n".join(" ".join(p.split()[i:i + 7]) for i in range(0, len(p.split()), 7))
                           for p in GOOD.split("\n"))   # hard-wrapped at 7 words: few lines end with '.'
    assert C4Lines().check(doc(wrapped))[0] is None or len(C4Lines().check(doc(wrapped))[0].text) < len(GOOD) / 2
    d, reason = C4Lines(unwrap_paragraphs=True).check(doc(wrapped))
    assert reason is None and d.text.split() == GOOD.split()


def test_fineweb_rules():
    f = FineWebQuality()
    assert f.reject_reason(GOOD) is None
    assert f.reject_reason("\n".join(f"item number {i} in a long list without stops" for i in range(30))) \
        == "line_punct_ratio"
    assert f.reject_reason("\n".join(f"Short {i}." for i in range(30))) == "short_line_ratio"
    lines = GOOD.split("\n")
    assert f.reject_reason("\n".join(lines + lines[:1])) == "char_dup_ratio"
    assert f.reject_reason("\n".join(f"{w}." for w in GOOD.split()[:60])) in ("list_ratio", "short_line_ratio")
    assert FineWebQuality(new_line_ratio=0.01).reject_reason(GOOD) == "list_ratio"


def test_filter_chain_and_config():
    fl = build_filters(None)
    assert [f.name for f in fl] == ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    d, reason = apply_filters(doc("tiny"), fl)
    assert d is None and reason == "gopher_quality:short_doc"
    assert apply_filters(doc(GOOD), fl)[1] is None
    assert [f.name for f in build_filters({"c4": False, "fineweb": {"line_punct_thr": 0.5}})] == ["fineweb"]
    with pytest.raises(DataPipelineError, match="unknown filters"):
        build_filters({"nope": {}})
    with pytest.raises(DataPipelineError, match="bad option"):
        build_filters({"c4": {"not_an_option": 1}})


def test_dedup_exact_and_near():
    dd = Deduplicator(DedupConfig(threshold=0.8))
    a, b = prose(1), prose(2)
    words = a.split(" ")
    words[3] = "different"
    near = " ".join(words)
    assert dd.check("a", a) is None
    assert dd.check("b", b) is None
    assert dd.check("a-upper", a.upper().replace(" ", "   ")) == "dedup:exact_of:a"
    r = dd.check("a-near", near)
    assert r.startswith("dedup:near_dup_of:a:") and float(r.rsplit(":", 1)[1]) >= 0.8
    assert dd.check("c", prose(3)) is None
    assert dd.stats == {"exact": 1, "near": 1, "kept": 3}
    # a half-changed document is not a near duplicate at 0.8
    half = " ".join(w if i % 2 else "x" + w for i, w in enumerate(b.split(" ")))
    assert dd.check("b-half", half) is None
    # exact-only configuration
    dd2 = Deduplicator(DedupConfig(near=False))
    assert dd2.check("a", a) is None and dd2.check("n", near) is None


def test_knowledge_scores_trivia_high_explanations_low():
    sports = score_text(SPORTS)
    lesson = score_text("To find the area of a triangle we multiply the base by the height and divide by two. "
                        "This works because two copies of the same triangle form a parallelogram, therefore each "
                        "triangle is half of it. For example, if the base is 6 and the height is 4, then the area "
                        "is 12, which means the formula gives the same answer as counting squares.")
    history = score_text("The printing press spread after 1450. Because books became cheap, literacy grew, which "
                         "means ideas travelled further; as a result reform movements grew faster in the 1500s.")
    assert sports.score > 0.8 and lesson.score < 0.3 and history.score < 0.5
    kf = KnowledgeFilter()
    d, r = kf.check(doc(SPORTS))
    assert r is None and d.metadata["knowledge"]["demoted"] is True
    assert kf.check(doc(prose(2)))[0].metadata["knowledge"]["demoted"] is False
    assert KnowledgeFilter(action="drop").check(doc(SPORTS))[1].startswith("knowledge:ephemeral:")


def test_decontam_index(tmp_path):
    idx = DecontamIndex()
    item = "Which of the following statements best describes the reason that the moon shows phases at night?"
    idx.add("arc:1", item)
    idx.add("toy:short", "What is the boiling point of pure water at sea level?")  # 11 words: whole match
    idx.add("toy:tiny", "What is 2+2?")  # under min_short_words: ignored
    assert idx.check(doc(GOOD + " " + item.upper()))[1] == "decontam:arc:1"
    assert idx.check(doc("so: what is the boiling point of pure water at sea level? 100 C"))[1] == "decontam:toy:short"
    assert idx.check(doc("what is 2 2 is four"))[1] is None
    assert idx.check(doc(GOOD))[1] is None
    # 12 of the 13 words is not a match
    assert idx.check(doc(" ".join(item.split()[:12])))[1] is None
    again = DecontamIndex.from_json(idx.to_json())
    assert again.check(doc(item))[1] == "decontam:arc:1"
    f = tmp_path / "items.jsonl"
    f.write_text(json.dumps({"id": 7, "task": "mine", "text": item}) + "\n")
    idx2 = DecontamIndex()
    idx2.add_jsonl(f)
    assert idx2.match(item) == "mine:7"


def test_decontam_with_eval_registry():
    """The eval side's benchmark loaders feed the index (ARC fixture files shipped with the eval tests)."""
    root = Path(__file__).parent / "data" / "eval"
    if not (root / "arc").exists():
        pytest.skip("eval fixtures not present")
    idx = DecontamIndex()
    idx.add_eval_tasks("arc_challenge", root)
    assert idx.items > 0


def test_readers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pocketlm.data.readers import read_documents

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text(json.dumps({"text": "hello", "url": "u"}) + "\n\n" +
                                            json.dumps({"id": "x", "text": "world"}) + "\n")
    pq.write_table(pa.table({"text": ["p1", "p2"], "lang": ["en", "en"]}), tmp_path / "c" / "b.parquet")
    (tmp_path / "c" / "sub").mkdir()
    (tmp_path / "c" / "sub" / "n.txt").write_text("plain text file")
    (tmp_path / "c" / "page.html").write_text(
        "<html><head><title>T</title></head><body><nav><a href='/'>Home</a> | <a href='/x'>About</a></nav>"
        "<article><h1>Tides</h1><p>" + " ".join(["The moon pulls the oceans and this makes the tides rise and "
                                                  "fall twice a day."] * 3) + "</p></article></body></html>")
    docs = list(read_documents(tmp_path / "c", "src"))
    ids = [d.id for d in docs]
    assert ids == ["src/a.jsonl:1", "x", "src/b.parquet:1", "src/b.parquet:2", "src/page.html", "src/sub/n.txt"]
    assert docs[0].metadata == {"url": "u", "source": "src"} and docs[2].metadata["lang"] == "en"
    html = docs[4].text
    assert "moon pulls the oceans" in html and "About" not in html
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataPipelineError, match="line 1"):
        list(read_documents(tmp_path / "bad.jsonl"))


# ---- gopher_repetition against datatrove's own GopherRepetitionFilter ------------------------------------------------

def _real_texts(limit: int = 300) -> list[str]:
    """Docstrings of the Python standard library: real English prose, on every machine with Python."""
    import importlib
    import inspect

    texts = []
    for name in ("argparse", "asyncio", "calendar", "collections", "csv", "dataclasses", "datetime", "decimal",
                 "difflib", "email.message", "enum", "fractions", "functools", "heapq", "http.client", "inspect",
                 "ipaddress", "itertools", "json", "logging", "multiprocessing.pool", "os", "pathlib", "pickle",
                 "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
                 "textwrap", "threading", "unittest", "urllib.parse", "uuid", "zipfile"):
        mod = importlib.import_module(name)
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or callable(obj) else None
            if doc and len(doc) >= 200 and doc not in texts:
                texts.append(doc)
    return texts[:limit]


def _adversarial_texts() -> list[str]:
    import random

    rng = random.Random(7)
    words = GOOD.split()
    lines = GOOD.split("\n")
    out = ["", " ", "\n", "\n\n\n", "word", "a b", "x\n\nx", "the the the the", "one.\n\n\ntwo.\n\n\n\none.",
           "\n".join(lines + [lines[0]] * 3), "\n\n".join([lines[1]] * 3 + lines), GOOD + "\n" + GOOD,
           GOOD + " " + " ".join(["buy now"] * 40), " ".join(words[:30] * 3), "ab ab ab cd cd cd ef",
           "Hello, world! Hello, world! Hello, world! Good-bye; world.", "tab\tseparated\ttab\tseparated\n" * 4,
           "crlf line\r\ncrlf line\r\nother line\r\n", "  leading and trailing blank lines  \n\n\n\n" + GOOD + "\n\n",
           "IS_ALPHA is a spaCy attribute name " * 5,
           "“Quoted” — dashes… and ellipses… “Quoted” — dashes…"]
    for i in range(120):
        pieces = [rng.choice(lines) for _ in range(rng.randint(1, 6))]
        frag = " ".join(rng.sample(words, rng.randint(3, 12)))
        reps = rng.randint(1, 8)
        sep = rng.choice(["\n", "\n\n", " ", "\n\n\n", ". "])
        text = sep.join(pieces + [frag] * reps + rng.sample(pieces, min(len(pieces), rng.randint(0, 3))))
        if rng.random() < 0.3:
            text = text.replace(" ", rng.choice(["  ", " , ", "-"]), rng.randint(1, 5))
        out.append(text)
    return out


def _datatrove_ratios(dt_filter, text: str) -> dict[str, float]:
    """Every ratio datatrove's filter compares, from datatrove's own helpers, splitters and word tokenizer."""
    from datatrove.pipeline.filters import gopher_repetition_filter as g
    from datatrove.utils.text import split_into_words

    res = {}
    paragraphs = dt_filter.paragraph_exp.split(text.strip())
    n, chars = g.find_duplicates(paragraphs)
    res["dup_para_frac"], res["dup_para_char_frac"] = n / len(paragraphs), chars / len(text)
    lines = dt_filter._line_splitter.split(text)
    n, chars = g.find_duplicates(lines)
    res["dup_line_frac"], res["dup_line_char_frac"] = n / len(lines), chars / len(text)
    words = split_into_words(text, dt_filter.language)
    for k, _ in dt_filter.top_n_grams:
        grams = g.get_n_grams(words, k)
        if grams:
            res[f"top_{k}_gram"] = g.find_top_duplicate(grams) / len(text)
    for k, _ in dt_filter.dup_n_grams:
        res[f"duplicated_{k}_n_grams"] = g.find_all_duplicate(words, k) / len(text)
    return res


@pytest.mark.parametrize("splitter", ["whitespace", "spacy"])
def test_gopher_repetition_matches_datatrove(splitter):
    """Identical keep/reject decisions, reasons and ratios on every document: 300 real texts (120 with spaCy) and
    141 adversarial repetitive ones. "spacy" is datatrove's default English word tokenizer; "whitespace" is compared
    with datatrove's filter given the same word splitter."""
    pytest.importorskip("datatrove")
    if splitter == "spacy":
        pytest.importorskip("spacy")
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            raise NotImplementedError

        def span_tokenize(self, text):
            raise NotImplementedError

    dt = GopherRepetitionFilter() if splitter == "spacy" else GopherRepetitionFilter(language=Whitespace())
    ours = GopherRepetition(word_splitter=splitter)
    real, adversarial = _real_texts(), _adversarial_texts()
    assert len(real) >= 250
    if splitter == "spacy":
        real = real[:120]   # datatrove's spaCy pipeline takes ~25 ms a document here
    rejected = 0
    for i, text in enumerate(real + adversarial):
        got = dt.filter(DTDocument(text=text, id=str(i)))
        expect = None if got is True else got[1]
        assert ours.reject_reason(text) == expect, (i, text[:200])
        rejected += expect is not None
        if text:
            assert ours.ratios(text) == pytest.approx(_datatrove_ratios(dt, text), abs=0, rel=0), (i, text[:200])
    assert 50 <= rejected <= len(real) + len(adversarial) - 50   # both outcomes are exercised
    # the cited definition, not a stricter one: a once-repeated 5-gram counts once, over the whole text's length
    text = "alpha beta gamma delta epsilon " * 2 + "zeta eta theta iota kappa lambda mu nu xi omicron pi rho"
    assert ours.ratios(text)["duplicated_5_n_grams"] == pytest.approx(len("alphabetagammadeltaepsilon") / len(text))
