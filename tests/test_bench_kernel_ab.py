"""bench/bench_kernel_ab.py: two kernels.c builds loaded side by side in one process, their batched decode steps
alternated on the default model; a revision git does not know is refused with its name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pocketlm.quant import kernels

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_kernel_ab.py"
pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernel_ab", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_builds_alternate_and_the_module_keeps_its_own(tmp_path, capsys):
    mod = load_bench()
    before = kernels._load()
    candidate = tmp_path / "kernels.c"  # another source text: its own library file, loaded beside HEAD's
    candidate.write_text(kernels.SOURCE.read_text() + "\n/* bench test */\n")
    out = tmp_path / "ab.json"
    assert mod.main(["--base", "HEAD", "--candidate", str(candidate), "--points", "2x8,3x20", "--prefill", "3x6",
                     "--rounds", "1", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(p["B"], p["keys"]) for p in result["points"]] == [(2, 8), (3, 20)]
    assert [(p["prompts"], p["tokens"]) for p in result["prefill"]] == [(3, 6)]
    for p in result["points"] + result["prefill"]:
        assert p["base_ms"] > 0 and p["candidate_ms"] > 0
        assert p["speedup"] == pytest.approx(p["base_ms"] / p["candidate_ms"])
    assert "--prefill 3x6" in result["command"]
    assert result["isa"] == kernels.isa() and result["model"] == "default"
    assert len(result["base"]) >= 7 and "HEAD" not in result["command"]  # the revision, resolved
    assert "speedup" in capsys.readouterr().out
    assert kernels._load() is before and kernels.SOURCE.name == "kernels.c"  # the module's library untouched


def test_an_unknown_revision_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no-such-revision"):
        load_bench().main(["--base", "no-such-revision", "--out", str(tmp_path / "x.json")])


def test_a_point_that_is_not_two_numbers_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="--prefill: '3xa' is not AxB"):
        load_bench().main(["--base", "HEAD", "--prefill", "3xa", "--out", str(tmp_path / "x.json")])


def test_q8_0_cache_points(tmp_path):
    """--kv q8_0: the decode points run on a q8_0 slot cache (random codes and scales), named in the JSON."""
    out = tmp_path / "ab.json"
    assert load_bench().main(["--base", "HEAD", "--points", "2x8,3x40", "--kv", "q8_0", "--rounds", "1",
                              "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kv"] == "q8_0" and "--kv q8_0" in result["command"]
    assert [(p["B"], p["keys"]) for p in result["points"]] == [(2, 8), (3, 40)]
    assert all(p["base_ms"] > 0 and p["candidate_ms"] > 0 for p in result["points"])
