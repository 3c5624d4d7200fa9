"""The pipeline end to end: known outcomes, SIGKILL + resume gives byte-identical shards, Dask gives the same."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import write_corpus  # noqa: E402

from pocketlm.data.pipeline import PipelineConfig, run  # noqa: E402
from pocketlm.data.records import DataPipelineError, read_part  # noqa: E402
from pocketlm.data.shards import ShardSet  # noqa: E402


def make_cfg(tmp: Path, out: str, **kw) -> dict:
    if not (tmp / "corpus" / "web.jsonl").exists():
        write_corpus(tmp / "corpus")
    d = {"out": str(tmp / out),
         "sources": [{"name": "web", "path": str(tmp / "corpus" / "web.jsonl")},
                     {"name": "synth", "kind": "synthetic", "count": 40, "seed": 5}],
         "part_docs": 4, "lines_per_task": 20, "workers": 2, "progress": False,
         "decontam": {"items": [str(tmp / "bench-items.jsonl")]},
         "mixture": {"phase1": {"web": {"weight": 1.0}},
                     "phase2": {"web": {"weight": 1.0, "exclude_demoted": True}, "synth": {"weight": 0.5}}},
         "shard_tokens": 2048}
    d.update(kw)
    return d


def shard_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "tokens").rglob("*")) if p.is_file()}


def test_pipeline_known_outcomes(tmp_path):
    rep = run(PipelineConfig.from_dict(make_cfg(tmp_path, "out")))
    out = tmp_path / "out"
    rejects = {}
    for f in (out / "rejects").rglob("*.jsonl"):
        for d in read_part(f):
            rejects[d.id] = d.metadata["reject_reason"]
    # datatrove's top-n-gram rule counts an n-gram seen once too, so a very short document falls to it before the
    # quality filter's word count (repetition runs first, as in FineWeb)
    assert rejects["short-40"] == "gopher_repetition:top_2_gram"
    assert rejects["repetitive-41"].startswith("gopher_repetition:")
    assert rejects["exact_dup-42"] == "dedup:exact_of:good-0"
    assert rejects["near_dup-43"].startswith("dedup:near_dup_of:good-1:")
    assert rejects["contaminated-45"] == "decontam:toy:moon"
    assert not any(k.startswith(("good-", "synthetic/")) for k in rejects)
    final = {d.id: d for f in (out / "parts" / "decontam").rglob("*.jsonl") for d in read_part(f)}
    assert final["sports-44"].metadata["knowledge"]["demoted"] is True
    st = rep["stages"]
    assert st["read"]["docs_in"] == 86 and st["decontam"]["docs_out"] == 81
    assert st["filter"]["reasons"]["gopher_repetition:top_2_gram"] == 1
    assert st["read"]["tokens_in"] > st["decontam"]["tokens_out"] > 0
    mix = json.loads((out / "tokens" / "mixture.json").read_text())
    assert mix["phase1"]["web"]["documents"] == 41 and mix["phase2"]["web"]["documents"] == 40  # sports demoted
    assert mix["phase2"]["synth"]["documents"] == 40
    ss = ShardSet(out / "tokens" / "phase1" / "web", verify=True)
    assert ss.num_tokens == mix["phase1"]["web"]["tokens"]
    assert (out / "report" / "knowledge-scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "| filter |" in (out / "report" / "report.md").read_text()
    # a second run is a no-op that reports the same
    again = run(PipelineConfig.from_dict(make_cfg(tmp_path, "out")))
    assert again["stages"] == rep["stages"]


def _run_and_kill(cfg_path: Path, out: Path, marker_glob: str, timeout: float = 60) -> bool:
    """Start the pipeline in its own process group; SIGKILL it once a file matching marker_glob appears."""
    code = ("import json,sys; from pocketlm.data.pipeline import PipelineConfig, run; "
            "run(PipelineConfig.from_file(sys.argv[1]))")
    p = subprocess.Popen([sys.executable, "-c", code, str(cfg_path)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if any(out.glob(marker_glob)):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return True
            if p.poll() is not None:
                assert p.returncode == 0, p.stderr.read().decode()[-2000:]
                return False
            time.sleep(0.01)
        raise AssertionError("pipeline did not reach the kill point")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_sigkill_and_resume_gives_identical_shards(tmp_path):
    clean = PipelineConfig.from_dict(make_cfg(tmp_path, "clean"))
    run(clean)
    expect = shard_digests(tmp_path / "clean")
    assert len(expect) >= 6
    cfg = make_cfg(tmp_path, "killed", throttle_s=0.03)
    cfg_path = tmp_path / "killed.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "killed"
    kills = 0
    for point in ("markers/filter/*/*.json", "dedup/signatures/*/*.npz", "markers/knowledge/*/*.json",
                  "markers/decontam/web/g00001-0002.json", "tokens/phase1/web/index.json"):
        kills += _run_and_kill(cfg_path, out, point)
    assert kills >= 3
    # no half-written shard folder looks complete
    for folder in (out / "tokens").rglob("*"):
        if folder.is_dir() and not folder.name.endswith(".tmp") and any(folder.glob("*.bin")):
            assert (folder / "index.json").exists()
    run(PipelineConfig.from_file(cfg_path))
    assert shard_digests(out) == expect


def test_dask_gives_the_same_shards(tmp_path):
    pytest.importorskip("distributed")
    from pocketlm.data.distributed import run_distributed

    run(PipelineConfig.from_dict(make_cfg(tmp_path, "local")))
    rep = run_distributed(PipelineConfig.from_dict(make_cfg(tmp_path, "dask")), n_workers=2)
    assert shard_digests(tmp_path / "dask") == shard_digests(tmp_path / "local")
    assert rep["stages"]["decontam"]["docs_out"] == 81


def test_config_errors(tmp_path):
    with pytest.raises(DataPipelineError, match="no sources"):
        PipelineConfig.from_dict({"sources": []})
    with pytest.raises(DataPipelineError, match="unknown source"):
        PipelineConfig.from_dict({"sources": [{"name": "a", "path": "x"}], "mixture": {"p": {"b": {}}}})
    with pytest.raises(DataPipelineError, match="min_edu needs the edu stage"):
        PipelineConfig.from_dict({"sources": [{"name": "a", "path": "x"}], "mixture": {"p": {"a": {"min_edu": 3}}}})
    with pytest.raises(DataPipelineError, match="pipeline config"):
        PipelineConfig.from_dict({"sources": [{"name": "a", "path": "x"}], "bogus": 1})


def test_data_commands(tmp_path, capsys):
    from pocketlm.data import commands

    assert commands.main(["synth", "--out", str(tmp_path / "s.jsonl"), "--count", "7", "--seed", "2"]) == 0
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 7
    cfg = make_cfg(tmp_path, "cli")
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert commands.main(["run", str(tmp_path / "c.json"), "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "decontam" in out and "report:" in out
    with pytest.raises(DataPipelineError, match="cannot read pipeline config"):
        commands.main(["run", str(tmp_path / "missing.json")])
