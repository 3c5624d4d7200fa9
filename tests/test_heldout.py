"""Held-out evaluation sets (`pocketlm.eval.heldout`) and the data-quality bench's smoke run."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketlm.config import preset
from pocketlm.data.synthetic import fmt, safe_eval
from pocketlm.eval import heldout
from pocketlm.eval.backends import PocketLMBackend
from pocketlm.eval.runner import evaluate
from pocketlm.formats import hf
from pocketlm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("river mill miller wheat flour morning birds children water bright garden window letter market engine "
         "planet island forest doctor kitchen bridge mountain teacher library").split()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def small_model():
    cfg = preset("nano").replace(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                 num_key_value_heads=2, max_position_embeddings=256)
    return hf.init_weights(hf.empty_model(cfg, torch.float32, "cpu"), seed=0).eval()


def _docs(n=400, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sents = []
        for _ in range(5):
            ws = [rng.choice(WORDS) for _ in range(rng.randint(9, 14))]
            sents.append(" ".join(ws).capitalize() + ".")
        out.append({"id": f"src{i % 3}/{i:05d}", "text": " ".join(sents), "source": f"src{i % 3}"})
    return out


def test_heldout_split_is_stable_and_about_two_percent():
    ids = [f"linux-doc/file-{i}.rst" for i in range(20000)]
    held = [i for i in ids if heldout.is_heldout(i)]
    assert 0.015 < len(held) / len(ids) < 0.025
    assert held == [i for i in ids if heldout.is_heldout(i)]
    assert all(heldout.is_heldout(i, 1.0) for i in ids[:10]) and not any(heldout.is_heldout(i, 0.0) for i in ids[:10])


def test_arith_items_verified_and_distinct():
    items, _ = heldout.arith_items(200)
    assert items == heldout.arith_items(200)[0]
    for it in items:
        value = fmt(safe_eval(it["expression"]))
        assert it["choices"][it["gold"]] == value == it["answer"]
        assert len(set(it["choices"])) == 4
        assert all(c.lstrip("-").isdigit() for c in it["choices"])
        assert it["context"].startswith("Question: ") and it["context"].endswith("\nAnswer:")
    golds = [it["gold"] for it in items]
    assert all(golds.count(g) > 25 for g in range(4))  # gold positions shuffled


def test_arith_decontamination_drops_training_questions():
    items, dropped = heldout.arith_items(50)
    q = items[3]["context"][len("Question: "):-len("\nAnswer:")]
    core = items[3]["expression"] if items[3]["kind"] == "expression" else q
    training = [f"Some lesson.\n\nExercise: {core.upper()}\n\nSolution: ..."]  # case and spacing normalised away
    again, dropped2 = heldout.arith_items(50, exclude_texts=training)
    assert dropped2 == dropped + 1
    assert all(it["expression"] != items[3]["expression"] or it["context"] != items[3]["context"] for it in again)


def test_cloze_items_reconstruct_the_sentence():
    docs = _docs()
    items = heldout.cloze_items(docs, 60)
    assert len(items) == 60
    texts = {d["id"]: d["text"] for d in docs}
    counts = heldout.word_counts(d["text"] for d in docs)
    for it in items:
        right = it["choices"][it["gold"]]
        assert right.startswith(it["word"])
        assert (it["context"] + " " + right) in texts[it["doc"]]
        rest = right[len(it["word"]):]
        for c in it["choices"]:
            assert c.endswith(rest)
            w = c[:len(c) - len(rest)] if rest else c
            assert abs(math.log2(counts[w]) - math.log2(counts[it["word"]])) < 2  # the same frequency band (+-1)
        assert len(set(it["choices"])) == 4
    assert len({it["doc"][:4] for it in items}) == 3  # sources interleaved


def test_build_writes_sets_and_tasks_load(tmp_path, tok, small_model):
    docs = _docs(1000)
    man = heldout.build(tmp_path, docs=docs, n_arith=20, n_cloze=16, n_synth=5, web_bytes=3000, fraction=0.1)
    assert man["arith"]["items"] == 20 and man["cloze"]["items"] == 16
    held = {d["id"] for d in docs if heldout.is_heldout(d["id"], 0.1)}
    assert man["heldout_documents"] == len(held) > 0
    cloze = [json.loads(line) for line in (tmp_path / "heldout-cloze" / "test.jsonl").read_text().splitlines()]
    assert {c["doc"] for c in cloze} <= held  # only held-out documents
    web = [json.loads(line) for line in (tmp_path / "heldout-ppl" / "web.jsonl").read_text().splitlines()]
    assert {w["id"] for w in web} <= held and sum(len(w["text"].encode()) for w in web) >= 3000
    backend = PocketLMBackend(small_model, tok, batch_size=8)
    run = evaluate(backend, list(heldout.TASKS), overrides={t.name: tmp_path / t.folder for t in heldout.TASKS},
                   progress=False)
    for t in heldout.TASKS:
        r = run["results"][t.name]
        assert r["n"] == man["arith" if t.name == "heldout-arith" else "cloze"]["items"]
        assert 0.0 <= r["score"] <= 1.0
        assert all(len(s["loglikelihoods"]) == 4 for s in run["samples"][t.name])
    res = heldout.evaluate_heldout(small_model, tok, tmp_path, limit=4)
    assert res["heldout-arith"]["n"] == 4 and res["heldout-arith"]["chance"] == 0.25
    assert 0 < res["bpb-web"]["bits_per_byte"] < 20 and res["bpb-synthetic"]["documents"] == 4


def test_build_errors(tmp_path):
    with pytest.raises(heldout.HeldoutError, match="corpus_dir or docs"):
        heldout.build(tmp_path)
    with pytest.raises(heldout.HeldoutError, match="no held-out documents"):
        heldout.build(tmp_path, docs=_docs(5), fraction=0.0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text("{not json\n")
    with pytest.raises(heldout.HeldoutError, match="not a corpus record"):
        list(heldout.read_corpus(tmp_path / "bad"))
    with pytest.raises(heldout.HeldoutError, match="missing"):
        heldout.ARITH_TASK.load(tmp_path / "nowhere")


class _Uniform(torch.nn.Module):
    """Uniform logits: every token costs ln(V) nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + 0 * self.w


def test_bits_per_byte_exact(tok, small_model):
    texts = ["Hello world, this is a test.", "Ünïcödé bytes count as bytes: 3 × 4 = 12."]
    n_tok = sum(len(tok.encode(t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    r = heldout.bits_per_byte(_Uniform(32064), tok, texts, seq_len=4, batch_size=3)
    assert r["tokens"] == n_tok and r["bytes"] == n_bytes
    assert r["bits_per_byte"] == pytest.approx(n_tok * math.log2(32064) / n_bytes, rel=1e-6)
    # a real model, one window: the same as the loss of one forward pass over [eos] + ids
    ids = [tok.eos_id] + tok.encode(texts[0])
    with torch.no_grad():
        logits = small_model(torch.tensor([ids[:-1]]))
        nll = torch.nn.functional.cross_entropy(logits[0].float(), torch.tensor(ids[1:]), reduction="sum")
    r = heldout.bits_per_byte(small_model, tok, texts[:1], seq_len=256)
    assert r["bits_per_byte"] == pytest.approx(float(nll) / math.log(2) / len(texts[0].encode()), rel=1e-5)


def test_data_quality_bench_smoke(tmp_path):
    """bench/data_quality.py end to end on a generated corpus (a few steps of a 1-layer model)."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "data_quality.py"), "smoke", "--work",
                        str(tmp_path / "dq")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "dq" / "results" / "data_quality.json").read_text())
    assert set(res["summary"]) == {"unfiltered", "data-optimal"}
    assert all(len(s["seeds"]) == 2 for s in res["summary"].values())
    md = (tmp_path / "dq" / "results" / "data_quality.md").read_text()
    assert "| unfiltered |" in md and "python bench/data_quality.py report" in md and "- Cloze MC" in md
    # resumable: a second run trains nothing
    p2 = subprocess.run([sys.executable, str(ROOT / "bench" / "data_quality.py"), "run", "--work",
                         str(tmp_path / "dq"), "--seeds", "0,1"], capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0 and p2.stdout.count("done already") == 4, p2.stdout[-2000:] + p2.stderr[-2000:]
