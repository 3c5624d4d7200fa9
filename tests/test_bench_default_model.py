"""bench/bench_default_model.py's bookkeeping: each row records the command and the engine (commit, kernels build,
instruction set) that measured it, and --merge keeps the file's other rows, its first command and its hand-written
note. The models' scoring itself (held-out sets, simple-qa) is tested where it lives (test_heldout, test_simple_qa)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pocketlm.quant import kernels

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_default_model.py"


@pytest.fixture
def bench(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_default_model", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import pocketlm.eval.heldout as heldout
    monkeypatch.setattr(heldout, "read_corpus", lambda corpus: iter([{"id": "a", "text": "x", "source": "s"}]))
    monkeypatch.setattr(heldout, "build", lambda tmp, docs, n_arith, n_cloze: {"sets": ["fixed"], "n": n_arith})
    scores = iter([0.25, 0.5, 0.75])

    def score(path, data, limit, repetition_penalty=None):  # a row of the shape score() returns
        s = next(scores)
        return {"heldout": {k: {"acc": s} for k in ("heldout-arith", "heldout-cloze")}
                | {k: {"bits_per_byte": 1 + s} for k in ("bpb-web", "bpb-synthetic")},
                "qa_acc": s, "qa_refusal": s, "qa_over_refusal": 0.0, "qa_degenerate": 0.0, "seconds": 1.0}

    monkeypatch.setattr(mod, "score", score)
    return mod


def test_rows_record_their_engine_and_merge_keeps_the_note(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    first = ["--corpus", str(tmp_path), "--models", "candidate", "--candidate", "a.gguf", "--label", "one",
             "--n", "5", "--out", str(out)]
    assert bench.main(first) == 0
    doc = json.loads(out.read_text())
    row = doc["models"]["one"]
    assert row["engine"]["kernels"] == kernels.library_path().stem and row["engine"]["isa"] == kernels.isa()
    assert row["command"] == doc["command"] and "--label one" in row["command"] and row["path"] == "a.gguf"
    doc["note"] = "written by hand"
    out.write_text(json.dumps(doc))
    second = [*first[:5], "b.gguf", "--label", "two", "--n", "5", "--out", str(out), "--merge"]
    assert bench.main(second) == 0
    doc = json.loads(out.read_text())
    assert list(doc["models"]) == ["one", "two"] and doc["note"] == "written by hand"
    assert "--label one" in doc["command"] and "--label two" in doc["models"]["two"]["command"]
    assert doc["models"]["one"]["qa_acc"] == 0.25 and doc["models"]["two"]["qa_acc"] == 0.5
    assert "two" in capsys.readouterr().out


def test_merge_refuses_rows_of_other_held_out_sets(bench, tmp_path):
    out = tmp_path / "r.json"
    args = ["--corpus", str(tmp_path), "--models", "candidate", "--candidate", "a.gguf", "--out", str(out)]
    assert bench.main([*args, "--n", "5"]) == 0
    with pytest.raises(SystemExit, match="other held-out sets"):
        bench.main([*args, "--n", "6", "--merge"])
