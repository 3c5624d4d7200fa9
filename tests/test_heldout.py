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


def _bench(*argv: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "data_quality.py"), *argv], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _shard_text(folder: Path, tok) -> str:
    """A token shard folder decoded back to text, normalised as `heldout.normalise` (documents joined by ' | ')."""
    from pocketlm.data.shards import ShardSet
    ss = ShardSet(folder)
    ids = ss.read(0, ss.num_tokens).tolist()
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return " | ".join(heldout.normalise(d) for d in docs + [tok.decode(cur)])


def test_data_quality_bench_smoke(tmp_path, tok):
    """bench/data_quality.py end to end on a generated corpus and a fake teacher folder (a few steps of a 1-layer
    model): three arms, the teacher arm's shards hold the teacher text and no held-out item, resumable."""
    work = tmp_path / "dq"
    _bench("smoke", "--work", str(work))
    res = json.loads((work / "results" / "data_quality.json").read_text())
    assert set(res["summary"]) == {"unfiltered", "data-optimal", "data-optimal+teacher"}
    assert all(len(s["seeds"]) == 2 for s in res["summary"].values())
    assert set(res["differences"]) == {"data-optimal - unfiltered", "data-optimal+teacher - unfiltered",
                                       "data-optimal+teacher - data-optimal"}
    for s in res["summary"].values():
        for key in ("heldout-arith", "heldout-cloze"):
            a = s[key]["above_chance"]
            assert a["clearly_above"] == (a["margin"] > 2 * a["stderr"]) and a["stderr"] > 0
    comp = res["setup"]["composition"]
    assert "synthetic" not in comp["data-optimal+teacher"] and "teacher" not in comp["data-optimal"]
    assert comp["data-optimal+teacher"]["teacher"] == pytest.approx(comp["data-optimal"]["synthetic"])
    assert comp["data-optimal"]["synthetic"] > 0
    assert comp["data-optimal+teacher"]["alpha"] == pytest.approx(comp["data-optimal"]["alpha"])
    md = (work / "results" / "data_quality.md").read_text()
    assert "| unfiltered |" in md and "python bench/data_quality.py report" in md and "- Cloze MC" in md
    assert "| data-optimal+teacher | 2 |" in md and "| data-optimal+teacher − data-optimal |" in md
    assert "clearly above?" in md and "--arms data-optimal+teacher --no-init &" in md and "--teacher-data" in md

    # the teacher arm's shards: teacher text in, held-out items and the planted held-out document out
    prepared = json.loads((work / "data" / "prepared.json").read_text())
    c = prepared["arm_c"]
    assert c["replaces"] == ["phase2/synthetic"] and c["heldout_excludes_teacher"]
    assert c["heldout_leaks_dropped"] == {"heldout-web-or-cloze": 1}          # lesson "leak-0"
    assert c["documents_per_file"] == {"chats.jsonl": 41, "knowledge.jsonl": 4, "lessons.jsonl": 1}  # torn line out
    text = _shard_text(Path(c["path"]), tok)
    teacher = work / "teacher"
    lines = (teacher / "chats.jsonl").read_text().split("\n")
    assert len(lines) == 42 and not lines[-1].endswith("}")                    # the last line is torn
    chats = {r["id"]: r for r in map(json.loads, lines[:-1])}
    q0 = chats["teacher-chat/arith-0"]["messages"][0]["content"]
    assert heldout.normalise(f"Question: {q0}\n\nAnswer: I work it out step by step.") in text
    assert heldout.normalise(chats["teacher-chat/007"]["messages"][2]["content"]) in text
    assert "you are a helpful teacher" not in text                             # no system prompt
    assert "the capital of france is paris" in text and "lesson: fractions." in text
    leak = next(r for r in _jsonl(teacher / "lessons.jsonl") if r["id"] == "teacher-lesson/leak-0")
    assert heldout.normalise(leak["text"])[20:200] not in text
    arith = _jsonl(work / "heldout" / "heldout-arith" / "test.jsonl")
    assert len(arith) == 12 and all(q0 not in it["context"] for it in arith)   # the held-out build dropped it
    for it in arith:
        core = it["expression"] if it["kind"] == "expression" else it["context"][len("Question: "):-len("\nAnswer:")]
        assert heldout.normalise(core) not in text
    for it in _jsonl(work / "heldout" / "heldout-cloze" / "test.jsonl"):
        assert heldout.normalise(it["context"][-40:] + it["choices"][it["gold"]]) not in text
    for d in _jsonl(work / "heldout" / "heldout-ppl" / "web.jsonl"):
        assert heldout.normalise(d["text"])[:120] not in text

    # resumable: a second run trains nothing
    p2 = _bench("run", "--work", str(work), "--seeds", "0,1")
    assert p2.stdout.count("done already") == 6, p2.stdout[-2000:] + p2.stderr[-2000:]

    # prepare without --teacher-data skips the third arm; adding it later keeps the held-out sets and drops the
    # teacher chat that asks a held-out question instead
    small = ["--corpus", str(work / "corpus"), "--pipeline", str(work / "pipeline"), "--n-arith", "12", "--n-cloze",
             "12", "--n-synth", "6", "--web-bytes", "4000", "--raw-tokens", "30000", "--seq-len", "32"]
    work2 = tmp_path / "dq2"
    p3 = _bench("prepare", "--work", str(work2), *small)
    assert "no --teacher-data" in p3.stdout and "arm_c" not in json.loads((work2 / "data/prepared.json").read_text())
    arith2 = (work2 / "heldout" / "heldout-arith" / "test.jsonl").read_text()
    assert q0 in arith2
    _bench("prepare", "--work", str(work2), "--teacher-data", str(teacher), *small)
    c2 = json.loads((work2 / "data" / "prepared.json").read_text())["arm_c"]
    assert not c2["heldout_excludes_teacher"]
    assert (work2 / "heldout" / "heldout-arith" / "test.jsonl").read_text() == arith2
    assert c2["heldout_leaks_dropped"] == {"heldout-arith": 1, "heldout-web-or-cloze": 1}
    assert heldout.normalise(q0) not in _shard_text(Path(c2["path"]), tok)
