"""`pocketlm eval` end to end on the CPU with a tiny random model: runs, reports, is reproducible, and never
touches the checkpoint (RELIABILITY.md item 24)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

import pocketlm
from pocketlm.cli import main
from pocketlm.formats.hf import save_checkpoint

DATA = Path(__file__).parent / "data" / "eval"
TASKS = "arc_easy,winogrande,truthfulqa_mc2,gsm8k,mbpp,humaneval"


def _tree_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(pocketlm.load("tiny", seed=1), folder, tokenizer=pocketlm.Tokenizer.default())
    return folder


def _run(checkpoint, out, *extra):
    return main(["eval", str(checkpoint), "--tasks", TASKS, "--data-dir", str(DATA), "--limit", "2",
                 "--max-tokens", "8", "--no-progress", "--out", str(out), *extra])


def test_end_to_end_reproducible_and_read_only(checkpoint, tmp_path, capsys):
    before = _tree_hash(checkpoint)
    assert _run(checkpoint, tmp_path / "a") == 0
    table = capsys.readouterr().out
    assert "Arc-E" in table and "HumanEval" in table and "phi-3-mini" in table and "94.6" in table
    assert _run(checkpoint, tmp_path / "b") == 0
    assert _tree_hash(checkpoint) == before  # evaluation never writes to the checkpoint

    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    for r in list(a["results"].values()) + list(b["results"].values()):
        r.pop("seconds")
    assert a == b
    assert set(a["results"]) == set(TASKS.split(","))
    for name, r in a["results"].items():
        assert r["n"] == 2 and 0.0 <= r["score"] <= 1.0 and r["stderr"] >= 0.0
        assert (tmp_path / "a" / f"samples_{name}.jsonl").read_bytes() == \
            (tmp_path / "b" / f"samples_{name}.jsonl").read_bytes()
    assert a["results"]["gsm8k"]["shots"] == 8 and a["results"]["arc_easy"]["shots"] == 10
    if importlib.util.find_spec("matplotlib") is not None:
        png = (tmp_path / "a" / "scores.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples_humaneval.jsonl").read_text().splitlines()]
    assert all(r["status"] in ("failed", "timeout", "memory", "violation") for r in rows)  # random model: no pass


def test_letter_format_and_chat_run(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--tasks", "mmlu,medqa", "--data-dir", str(DATA), "--limit", "2",
                 "--format", "letter", "--shots", "1", "--no-progress", "--out", str(tmp_path), "--no-chart"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert res["mmlu"]["format"] == "letter" and res["mmlu"]["metric"] == "acc"
    sample = json.loads((tmp_path / "samples_mmlu.jsonl").read_text().splitlines()[0])
    assert "Options:\nA. " in sample["prompt"] and sample["gold"] == "B"
    assert main(["eval", str(checkpoint), "--tasks", "boolq", "--data-dir", str(DATA), "--limit", "1", "--chat",
                 "--no-progress"]) == 0
    capsys.readouterr()


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["eval", "tiny", "--tasks", "nope", "--data-dir", str(DATA)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "tiny", "--tasks", "boolq", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "boolq" / "dev.jsonl") in err and "expected layout" in err
    assert main(["eval", "tiny", "--tasks", "boolq", "--limit", "0"]) == 2


def test_task_list(capsys):
    assert main(["eval", "tasks"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 21 and "hendrycks" in out


def test_contamination_report(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    leaked = ("Windows Movie Maker is a discontinued video editing software by Microsoft. It was a part of Windows "
              "Essentials software suite.")
    (corpus / "web.jsonl").write_text(json.dumps({"text": "some page ... " + leaked + " ... more"}) + "\n" +
                                      json.dumps({"text": "an unrelated page about gardening"}) + "\n")
    (corpus / "book.txt").write_text("Which planet is known as the red planet?")  # a short MMLU item, verbatim
    assert main(["eval", "contamination", "--corpus", str(corpus), "--tasks", "boolq,mmlu,gsm8k",
                 "--data-dir", str(DATA), "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "contamination.json").read_text())
    assert rep["n"] == 13
    assert rep["tasks"]["boolq"]["contaminated"] == 2 and rep["tasks"]["boolq"]["items"] == 2
    assert rep["tasks"]["boolq"]["examples"][0]["source"].endswith("web.jsonl:1")
    assert rep["tasks"]["mmlu"]["contaminated"] == 1
    assert rep["tasks"]["gsm8k"]["contaminated"] == 0
    assert "boolq" in capsys.readouterr().out


def test_contamination_reads_parquet_corpora(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    leaked = "Janet has 3 apples and buys 4 more. How many apples does she have? " * 2
    pq.write_table(pa.table({"text": [leaked, "nothing to see"]}), tmp_path / "shard-0.parquet")
    assert main(["eval", "contamination", "--corpus", str(tmp_path / "shard-0.parquet"), "--tasks", "gsm8k",
                 "--data-dir", str(DATA), "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "contamination.json").read_text())
    assert rep["tasks"]["gsm8k"]["contaminated"] == 1 and rep["tasks"]["gsm8k"]["items"] == 2
