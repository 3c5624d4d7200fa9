"""bench/bench_kv_cache.py's long-context mode on a tiny GGUF: --model, --lengths 48,128, --extend ntk, per-type
processes with peak RSS; perplexities checked against whole-window forwards without any cache."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

import pocketlm

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_kv_cache.py"
CONTEXT = 64


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kv_cache", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A float GGUF of a tiny GQA model with a 64-token context, and a text file of ~400 tokens."""
    from pocketlm.formats import hf
    from pocketlm.config import preset
    from pocketlm.quant.gguf_export import export_gguf
    d = tmp_path_factory.mktemp("kvbench")
    config = preset("tiny-gqa").replace(max_position_embeddings=CONTEXT, original_max_position_embeddings=CONTEXT)
    model = hf.init_weights(hf.empty_model(config, torch.float32, "cpu"), 0)
    export_gguf(model, d / "tiny.gguf", tokenizer=pocketlm.Tokenizer.default(), scheme="f32")
    r = random.Random(0)
    words = "the cache holds keys and values of every layer for each position in the window".split()
    (d / "text.txt").write_text(" ".join(r.choice(words) for _ in range(400)) + "\n", encoding="utf-8")
    return d / "tiny.gguf", d / "text.txt"


@torch.inference_mode()
def reference_ppl(model, config, ids: list[int]) -> float:
    """Perplexity of one whole window under `config`'s rotary setting, no cache (longrope_search.perplexity)."""
    from pocketlm.longrope_search import perplexity
    return perplexity(model, [ids], config)


def test_long_mode_matches_whole_window_forwards(files, tmp_path):
    from pocketlm.config import RopeScaling
    from pocketlm.kvcache import kv_cache_bytes
    from pocketlm.longrope_search import ntk_factors
    gguf, text = files
    bench = load_bench()
    out = tmp_path / "kv.json"
    res = bench.main(["--model", str(gguf), "--text", str(text), "--lengths", "48,128", "--windows", "2,1",
                      "--chunk", "16", "--extend", "ntk", "--types", "f32,q4_0", "--in-process", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    rows = {(r["length"], r["kv_cache"]): r for r in res["rows"]}
    assert list(rows) == [(48, "f16"), (48, "f32"), (48, "q4_0"), (128, "f16"), (128, "f32"), (128, "q4_0")]
    assert res["windows"] == {"48": 2, "128": 1} and res["extension"]["48"] is None
    ext = res["extension"]["128"]
    assert ext["method"] == "ntk" and ext["scale"] == 2.0 and ext["original"] == CONTEXT

    model = pocketlm.load(str(gguf), dtype="float32").eval()
    ids = pocketlm.Tokenizer.default().encode(text.read_text(encoding="utf-8"))
    native = model.config
    # 48 tokens: the model as it is; two windows, NLL summed over both
    nll = sum(math.log(reference_ppl(model, native, ids[i * 48:(i + 1) * 48])) * 47 for i in range(2))
    assert rows[(48, "f32")]["perplexity"] == pytest.approx(math.exp(nll / 94), rel=1e-4)
    # 128 tokens = 2 x the context: NTK-aware factors s^(2i/(d-2)), magnitude 1, for the whole window
    n = native.rotary_dim // 2
    ntk = native.replace(max_position_embeddings=128, original_max_position_embeddings=CONTEXT,
                         rope_scaling=RopeScaling(short_factor=(1.0,) * n, long_factor=tuple(ntk_factors(n, 2.0)),
                                                  attention_factor=1.0))
    want = reference_ppl(model, ntk, ids[:128])
    got = rows[(128, "f32")]["perplexity"]
    plain = reference_ppl(model, native.replace(max_position_embeddings=128), ids[:128])  # plain RoPE
    assert abs(got - want) < 0.05 * abs(plain - want)  # the NTK frequencies, not plain RoPE's
    for L in (48, 128):
        f16, f32, q4 = rows[(L, "f16")], rows[(L, "f32")], rows[(L, "q4_0")]
        assert f16["ppl_vs_f16"] == 1.0 and f16["top1_agree_f16"] == 1.0
        assert f16["perplexity"] == pytest.approx(f32["perplexity"], rel=1e-2)
        assert q4["ppl_vs_f16"] == pytest.approx(q4["perplexity"] / f16["perplexity"], rel=1e-12)
        assert abs(q4["ppl_vs_f16"] - 1) > 1e-5 and abs(q4["ppl_vs_f16"] - 1) < 0.2  # read back quantized
        assert 0.5 < q4["top1_agree_f16"] <= 1.0
        for r in (f16, f32, q4):
            assert r["cache_bytes"] == kv_cache_bytes(native, L, r["kv_cache"])
            assert "peak_rss_mb" not in r
    assert rows[(128, "q4_0")]["cache_vs_f16"] == pytest.approx((32 + 4) / 128)  # head_dim 64: 2 blocks of 18 B


def test_isolated_types_report_peak_rss_and_the_same_numbers(files, tmp_path):
    gguf, text = files
    bench = load_bench()
    args = ["--model", str(gguf), "--text", str(text), "--lengths", "48", "--windows", "1", "--chunk", "32",
            "--types", "q8_0"]
    alone = bench.main(args + ["--out", str(tmp_path / "a.json")])["rows"]
    together = bench.main(args + ["--in-process", "--out", str(tmp_path / "b.json")])["rows"]
    assert [r["kv_cache"] for r in alone] == ["f16", "q8_0"]
    for a, b in zip(alone, together):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)
        assert a["top1_agree_f16"] == b["top1_agree_f16"]
        assert 0 < a["rss_after_load_mb"] <= a["peak_rss_mb"] < 4096


def test_bad_arguments_are_refused(files, tmp_path):
    gguf, text = files
    bench = load_bench()
    with pytest.raises(SystemExit, match="one per length"):
        bench.main(["--lengths", "48,128", "--windows", "1,2,3"])
    with pytest.raises(SystemExit, match="not cache types"):
        bench.main(["--types", "q5_0"])
    with pytest.raises(SystemExit, match="exceeds the model's context 64"):
        bench.main(["--model", str(gguf), "--text", str(text), "--lengths", "128", "--windows", "1",
                    "--in-process", "--out", str(tmp_path / "x.json")])
