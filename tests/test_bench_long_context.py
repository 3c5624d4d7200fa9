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
        phases = saved["decode_threads"]  # decode timed at the bench's threads, then at 1 thread
        assert phases == ([saved["threads"], 1] if saved["threads"] > 1 else [1])
        assert run["final_length"] == n + 3 * len(phases)
        assert ours["prompt_tok_s"] == pytest.approx(n / run["prompt_s"])
        assert all(len(run["decode"][k]) == 3 for k in ("token_s", "token_wait_s", "token_cpu_s"))
        # 3 decoded, the first a warm-up: tok/s = 1 / the median time of the other two (= their mean)
        assert ours["decode_tok_s"] == pytest.approx(2 / sum(run["decode"]["token_s"][1:]))
        if len(phases) == 2:
            assert ours["decode_1t_cpu_tok_s"] == pytest.approx(2 / sum(run["decode_1t"]["token_cpu_s"][1:]))
            assert ours["decode_1t_tok_s"] == pytest.approx(2 / sum(run["decode_1t"]["token_s"][1:]))
        assert ours["decode_tok_s_range"][0] <= ours["decode_tok_s"] <= ours["decode_tok_s_range"][1]
        assert 0.0 <= run["prompt_wait_share"] <= 1.0 and 0.0 <= run["decode_wait_share"] <= 1.0
        if skip_llama:
            continue
        theirs = entry["llama_cpp"]["llama.cpp (fa on)"]
        assert theirs["prompt_tokens"] == n and theirs["rope_mode"] == "short"
        assert saved["runs"][str(n)]["llama.cpp (fa on)"][0]["final_length"] == n + 3 * len(phases)
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


def test_summarise_run_takes_the_median_token_and_the_wait_share():
    """Decode tok/s is 1 / the median token time after the warm-up (a preempted token does not move it), the
    wait share is run-queue wait / (wall x threads), the 1-thread phase also gives tokens per CPU-second."""
    bench = load_bench()
    run = {"prompt_s": 2.0, "prompt_wait_s": 1.0,
           "decode": {"token_s": [9.0, 0.1, 0.1, 5.0], "token_wait_s": [0.0, 0.0, 0.1, 9.9],
                      "token_cpu_s": [1.0, 0.2, 0.2, 0.2]},
           "decode_1t": {"token_s": [1.0, 0.5, 0.25, 0.25], "token_wait_s": [0.0, 0.25, 0.0, 0.25],
                         "token_cpu_s": [1.0, 0.1, 0.2, 0.1]}}
    r = bench.summarise_run(run, 1000, 2)
    assert r["prompt_tok_s"] == pytest.approx(500.0) and r["prompt_wait_share"] == pytest.approx(0.25)
    assert r["decode_tok_s"] == pytest.approx(10.0)  # median of 0.1, 0.1, 5.0; the 9 s warm-up left out
    assert r["decode_s"] == pytest.approx(5.2) and r["decode_wait_share"] == pytest.approx(10.0 / (5.2 * 2))
    assert r["decode_1t_tok_s"] == pytest.approx(4.0) and r["decode_1t_wait_share"] == pytest.approx(0.5)
    assert r["decode_1t_cpu_tok_s"] == pytest.approx(10.0) and "decode_cpu_tok_s" not in r  # 2 threads: spin
    assert bench.decode_threads(2) == [2, 1] and bench.decode_threads(1) == [1]
    assert bench.context_length(4096, 16, 2) == 4096 + 32 and bench.context_length(4096, 16, 1) == 4096 + 16
