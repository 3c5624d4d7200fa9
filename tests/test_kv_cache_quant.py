"""Quantized KV caches (pocketlm.kvcache): bit-exact ggml Q8_0/Q4_0 blocks, the PyTorch, C-engine and serving
caches that hold them, the `--kv-cache`/`--num-ctx`/`info --ctx` options, and the memory plan against RSS."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import pocketlm
from pocketlm.config import preset
from pocketlm.errors import ConfigError
from pocketlm.kvcache import (KV_CACHE_TYPES, QuantizedKV, dense, dequantize, kv_cache_bytes, kv_store, memory_plan,
                              quantize)
from pocketlm.quant import codecs, kernels


def _ggml_bytes(codes, scales, kv_type):
    """Our (codes, f16 scales) as interleaved ggml blocks: f16 d | 32 int8 (Q8_0) or 16 nibble bytes (Q4_0)."""
    width = 32 if kv_type == "q8_0" else 16
    d = scales.reshape(-1, 1).numpy().view(np.uint8).reshape(-1, 2)
    return np.concatenate([d, codes.reshape(-1, width).numpy().view(np.uint8)], axis=1)


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_blocks_are_ggml_bytes(kv_type):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 96, generator=g) * torch.rand(300, 1, generator=g) * 5
    x[0] = 0  # an all-zero block: d = 0, codes 0 (q8_0) / 8 (q4_0)
    x[1, :32] = 1e-3
    x[2, 5] = -40.0  # a negative signed max (q4_0 keeps its sign in d)
    codes, scales = quantize(x, kv_type)
    ref = getattr(codecs, f"quantize_{kv_type}")(x.numpy()).reshape(-1, 34 if kv_type == "q8_0" else 18)
    assert np.array_equal(_ggml_bytes(codes, scales, kv_type), ref)
    back = dequantize(codes, scales, kv_type)
    want = torch.from_numpy(getattr(codecs, f"dequantize_{kv_type}")(ref.reshape(-1))).reshape(x.shape)
    assert torch.equal(back, want)
    # the error of a value is at most half a step (q8_0) / one step (q4_0's asymmetric clamp) of its block's
    # scale, plus the scale's f16 rounding times the code (<= 127 or 8 steps x 2^-11)
    step = scales.float().abs().repeat_interleave(32, dim=-1)
    assert ((back - x).abs() <= step * (0.57 if kv_type == "q8_0" else 1.01) + 1e-6).all()


def test_quantized_store_indexes_leading_axes_like_a_tensor():
    g = torch.Generator().manual_seed(2)
    for kv_type in ("int8", "q8_0", "q4_0"):
        store = QuantizedKV.empty((2, 3, 4, 10, 64), kv_type)
        assert store.shape == (2, 3, 4, 10, 64)
        ref = torch.zeros(2, 3, 4, 10, 64)
        x = torch.randn(3, 4, 5, 64, generator=g)
        store[1, :, :, 2:7] = x
        ref[1, :, :, 2:7] = dense(QuantizedKV(*quantize(x, kv_type), kv_type, 64))
        rows, pos = torch.tensor([0, 2]), torch.tensor([9, 1])
        y = torch.randn(2, 4, 64, generator=g)  # the serving slot cache's decode write: [layer, rows, :, pos]
        store[0, rows, :, pos] = y
        ref[0, rows, :, pos] = dense(QuantizedKV(*quantize(y, kv_type), kv_type, 64))
        assert torch.equal(store.dequantize(), ref)
        assert torch.equal(store[1, :, :, 2:7].dequantize(), ref[1, :, :, 2:7])
        other = QuantizedKV.empty((4, 5, 64), kv_type)
        other[:, :] = store[1, 0, :, 2:7]  # block copies move codes, not re-quantized floats
        assert torch.equal(other.codes, store.codes[1, 0, :, 2:7])
    with pytest.raises(ConfigError, match="multiple of 32"):
        QuantizedKV.empty((2, 48), "q4_0")
    with pytest.raises(ConfigError, match="fp8"):
        kv_store((2, 64), "fp8", torch.float32)


def test_plan_bytes_are_the_stores_bytes():
    c = preset("phi-3-mini-4k")
    assert kv_cache_bytes(c, 4096, "f16") == 2 * 32 * 32 * 4096 * 96 * 2
    assert kv_cache_bytes(c, 4096, "q8_0") == 2 * 32 * 32 * 4096 * (96 + 6)  # 3 blocks of 32, 2-byte scales
    assert kv_cache_bytes(c, 4096, "q4_0") == 2 * 32 * 32 * 4096 * (48 + 6)
    model = pocketlm.load("tiny")
    for t in KV_CACHE_TYPES:
        model.kv_cache_type = t
        cache = model.make_cache(1, 40)
        store = cache.k.nbytes() if isinstance(cache.k, QuantizedKV) else cache.k.numel() * cache.k.element_size()
        assert 2 * store == kv_cache_bytes(model.config, 40, t), t
    plan = memory_plan(c, 131072, 7_000_000_000, "bf16")
    assert plan["kv_cache_bytes"]["f16"] == 48 * 2**30  # the 48 GiB at 128K
    assert plan["total_bytes"]["q4_0"] == 7_000_000_000 + 2 * 32 * 32 * 131072 * 54


@pytest.mark.parametrize("kv_type, tol", [("f16", 2e-3), ("q8_0", 2e-2), ("int8", 2e-2), ("q4_0", 0.25)])
def test_pytorch_cache_types_decode_close_to_f32(kv_type, tol):
    model = pocketlm.load("tiny", seed=4)
    ids = torch.randint(0, 32000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids)  # no cache: the reference
        out = {}
        for t in ("f32", kv_type):
            model.kv_cache_type = t
            cache = model.make_cache(1, 40)
            model(ids[:, :30], cache)
            out[t] = torch.cat([model(ids[:, i:i + 1], cache) for i in range(30, 40)], dim=1)
    model.kv_cache_type = None
    assert torch.allclose(out["f32"], full[:, 30:], atol=1e-4)
    err = ((out[kv_type] - full[:, 30:]).abs().amax() / full.abs().amax()).item()
    assert 0 < err < tol, err  # quantized: close, and not trivially identical


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")


@needs_kernels
@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_c_decode_step_on_quantized_cache_matches_pytorch_step(kv_type):
    from pocketlm.engine import cpu
    from pocketlm.quant.random_model import random_quantized_model
    model = random_quantized_model(preset("tiny-gqa"), "Q4_0", seed=3)
    fast = cpu.accelerate(model, kv_type)
    assert isinstance(fast, cpu.FastDecoder) and fast.kv_dtype == kv_type
    ids = torch.randint(0, 32000, (1, 20), generator=torch.Generator().manual_seed(1))
    errs = []
    with torch.inference_mode():
        cache = fast.make_cache(1, 20)
        assert cache.nbytes() == cpu.kv_cache_bytes(model.config, 20, kv_type)
        fast(ids[:, :12], cache)
        for t in range(12, 20):
            twin = copy.deepcopy(cache)
            want = model(ids[:, t:t + 1], twin, last_only=True)  # PyTorch, keys quantized by kvcache.quantize
            got = fast(ids[:, t:t + 1], cache, last_only=True)  # C: quantized by kernels.c store_kv
            errs.append(((got - want).abs().max() / want.abs().max()).item())
            # the new position's keys as C stored them (kernels.c store_kv) and as kvcache.quantize did, from
            # keys that differ by ~1% (the two paths' float sums): within one quantization step of each other
            a, b = cache.k[:, :, t].dequantize(), twin.k[:, :, t].dequantize()
            step = torch.maximum(cache.k.scales[:, :, t], twin.k.scales[:, :, t]).float().abs()
            assert ((a - b).abs() <= step.repeat_interleave(32, -1) * 1.01 + 0.02 * b.abs().max()).all()
    assert sorted(errs)[len(errs) // 2] < 1e-3 and max(errs) < 5e-2, errs


SYSTEM = [1] + [(i * 7919) % 31000 + 500 for i in range(100)]  # 101 ids: 3 full 32-token blocks


def _gen(model, tok, prompt_ids, max_tokens, ctx):
    from pocketlm.serve.schemas import Limits, parse_request
    return parse_request({"model": "m", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0},
                         "completion", tokenizer=tok, model_names=["m"], limits=Limits(max_n=4, context_length=ctx),
                         vocab_size=model.config.vocab_size)


def _run(engine, gens, timeout=120):
    """Submit GenRequests at once; return each one's {choice index: [token ids]}."""
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()

        async def one(gen):
            q = asyncio.Queue()
            engine.submit(gen, loop, q)
            ids = {}
            while True:
                ev = await asyncio.wait_for(q.get(), timeout)
                assert ev["type"] != "error", ev
                if ev["type"] == "done":
                    return ids
                if "token" in ev:
                    ids.setdefault(ev["index"], []).append(ev["token"])
        return await asyncio.gather(*[one(g) for g in gens])
    return asyncio.run(main())


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_serving_with_a_quantized_cache_equals_generate_alone(kv_type):
    """Slots, batched prefills and prefix-cache blocks all hold the quantized codes: a prompt served beside others
    (its system prompt's 3 blocks from the prefix cache) decodes as generate() alone with the same cache type."""
    from pocketlm import Tokenizer
    from pocketlm.engine.generate import generate_ids
    from pocketlm.engine.sampling import SamplingParams
    from pocketlm.serve.batching import Engine
    tok = Tokenizer.default()
    model = pocketlm.load("tiny")
    model.kv_cache_type = kv_type
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(model, tok, max_slots=4, max_queue=8, context_length=256, prefix_cache=True)
    try:
        prompts = [SYSTEM + [700 + 13 * i + j for j in range(3 + 5 * i)] for i in range(4)]
        out = _run(engine, [_gen(model, tok, prompts[0], 6, 256)]) + _run(
            engine, [_gen(model, tok, p, 6, 256) for p in prompts[1:]])
        for p, ids in zip(prompts, out):
            alone = list(generate_ids(model, p, SamplingParams(temperature=0, max_tokens=6),
                                      stop_token_ids=[tok.eos_id], vocab_limit=len(tok)))
            assert ids[0] == alone
        assert engine.stats()["prefix_hit_tokens"] == 96 * 3
        assert isinstance(engine.cache.k, QuantizedKV) and engine.cache.k.kv_type == kv_type
        assert engine.prefix.block_bytes == kv_cache_bytes(model.config, 32, kv_type)
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)


def test_cli_kv_cache_num_ctx_and_info_plan(tmp_path, capsys):
    from pocketlm.cli import main
    assert main(["info", "phi-3-mini-128k", "--ctx", "131072", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["ctx"] == 131072 and plan["weights"] == "bf16"
    assert plan["kv_cache_bytes"] == {t: kv_cache_bytes(preset("phi-3-mini-128k"), 131072, t) for t in KV_CACHE_TYPES}
    assert plan["total_bytes"]["f16"] == plan["weights_bytes"] + 48 * 2**30
    assert main(["info", "phi-3-mini-128k", "--ctx", "4096"]) == 0
    out = capsys.readouterr().out
    assert "memory plan at 4096 tokens" in out and "q4_0" in out and "432.0 MiB" in out  # 4096 x 108 KiB
    # run: a float model with a q4_0 cache; --num-ctx caps prompt + reply (the cache's capacity)
    assert main(["run", "tiny", "Hi", "--raw", "--max-tokens", "5", "--kv-cache", "q4_0", "--num-ctx", "64"]) == 0
    capsys.readouterr()
    assert main(["run", "tiny", "Hi", "--raw", "--max-tokens", "5", "--num-ctx", "1"]) == 2
    assert "num_ctx is 1" in capsys.readouterr().err
    assert main(["run", "tiny", "Hi", "--raw", "--num-ctx", "999999"]) == 2
    assert "--num-ctx 999999" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "tiny", "Hi", "--kv-cache", "q5_0"])
    from pocketlm.serve.commands import add_arguments
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["tiny", "--kv-cache", "q8_0", "--num-ctx", "2048"])
    assert args.kv_cache == "q8_0" and args.context_length == 2048


RSS_PROBE = textwrap.dedent('''
    import gc, json, sys, torch
    import pocketlm
    from pocketlm.kvcache import QuantizedKV, quantize
    from pocketlm.model import KVCache

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    n = int(sys.argv[1])
    model = pocketlm.load("tiny")
    c = model.config
    k = torch.randn(1, c.num_key_value_heads, 1024, c.head_dim)
    out = {}
    with torch.inference_mode():
        for kv_type in sys.argv[2:]:
            gc.collect()
            before = anon()
            cache = KVCache(c, 1, n, torch.float32, "cpu", kv_type)  # calloc'd: resident once written
            chunk = k
            if kv_type in ("int8", "q8_0", "q4_0"):  # quantized once, then copied code for code
                chunk = QuantizedKV(*quantize(k, kv_type), kv_type, c.head_dim)
            for layer in range(c.num_hidden_layers):
                for start in range(0, n, 1024):  # what update() stores (its float return value is transient)
                    cache.k[layer, :, :, start:start + 1024] = chunk
                    cache.v[layer, :, :, start:start + 1024] = chunk
            out[kv_type] = anon() - before
            del cache
    print(json.dumps(out))
''')


def test_memory_plan_matches_measured_rss():
    """`pocketlm info --ctx N`'s cache figures against the resident memory a full cache of N positions takes
    (tiny model: 2 layers x 4 heads x 64; N = 65536 -> 256 MiB in f32, 36 MiB in q4_0). Tolerance: 3% + 4 MiB
    (allocator slack, the quantizer's temporaries); measured 1-2 MiB over the plan."""
    n = 65536
    types = ["f32", "f16", "int8", "q8_0", "q4_0"]
    # a fixed mmap threshold: every large block is a fresh mapping, unmapped when freed (glibc's dynamic threshold
    # would put the next cache's scales on heap pages a previous one left resident)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, str(n), *types], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    grown = json.loads(r.stdout.strip().splitlines()[-1])
    plan = memory_plan(preset("tiny"), n, 0, "none")["kv_cache_bytes"]
    for t in types:
        print(f"{t}: plan {plan[t] / 2**20:.1f} MiB, measured {grown[t] / 2**20:.1f} MiB")
        assert abs(grown[t] - plan[t]) <= 0.03 * plan[t] + 4 * 2**20, (t, grown[t], plan[t])
