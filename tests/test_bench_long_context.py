"""bench/bench_long_context.py's quick mode: both engines prefill the whole prompt, the JSON holds the table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pocketlm.quant import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: "
                                                                f"{kernels.unavailable_reason()}")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_long_context.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_mode_writes_the_comparison(tmp_path):
    bench = load_bench()
    try:
        import llama_cpp  # noqa: F401
        skip_llama = []
    except ImportError:
        skip_llama = ["--skip-llama"]
    out = tmp_path / "long.json"
    result = bench.main(["--quick", "--decode", "3", "--out", str(out)] + skip_llama)
    saved = json.loads(out.read_text())
    assert saved["lengths"] == [1024, 2048] and saved["layers"] == 1 and saved["preset"] == "phi-3-mini-128k"
    assert saved["table"] == json.loads(json.dumps(result["table"]))
    assert saved["machine"]["isa"] == kernels.isa() and len(saved["load_avg"]["before"]) == 3
    for entry, n in zip(saved["table"], [1024, 2048]):
        ours = entry["pocketlm"]
        assert entry["length"] == n and ours["prompt_tokens"] == n
        assert ours["rope_mode"] == "short"  # 2048 + 3 tokens fit the original 4096 context
        assert ours["prompt_tok_s"] > 0 and ours["decode_tok_s"] > 0
        run = saved["runs"][str(n)]["pocketlm"][0]
        assert run["final_length"] == n + 3
        assert ours["prompt_tok_s"] == pytest.approx(n / run["prompt_s"])
        assert ours["decode_tok_s"] == pytest.approx(2 / run["decode_s"])  # 3 decoded, the first a warm-up
        if skip_llama:
            continue
        theirs = entry["llama_cpp"]["llama.cpp (fa on)"]
        assert theirs["prompt_tokens"] == n and theirs["rope_mode"] == "short"
        assert saved["runs"][str(n)]["llama.cpp (fa on)"][0]["final_length"] == n + 3
        assert entry["baseline"] == "llama.cpp (fa on)"
        assert entry["prompt_vs_llama_cpp"] == pytest.approx(ours["prompt_tok_s"] / theirs["prompt_tok_s"])
        assert entry["decode_vs_llama_cpp"] == pytest.approx(ours["decode_tok_s"] / theirs["decode_tok_s"])
        # the same model computed by both engines (q8 activations, f16 caches: close, not bit-equal)
        check = entry["logits_check"]["llama.cpp (fa on)"]
        assert check["cosine"] > 0.99 and check["top10_overlap"] >= 5


def test_lengths_are_validated():
    bench = load_bench()
    assert bench.parse_lengths("4096, 16384") == [4096, 16384]
    for bad in ("", "4k", "1,0"):
        with pytest.raises(SystemExit):
            bench.parse_lengths(bad)
