"""Prompt chunks in C (quant/kernels.c pl_prefill, engine/cpu.py FastDecoder.prefill_chunk) against the PyTorch
path they replace, and pl_prefill's flash attention (pl_attention) against float64 attention over the same cache."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import pocketlm
from pocketlm.config import preset
from pocketlm.engine import cpu
from pocketlm.engine.generate import generate_full
from pocketlm.errors import GenerationError, StaleCacheError
from pocketlm.kvcache import QuantizedKV
from pocketlm.quant import kernels
from pocketlm.quant.random_model import random_quantized_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: "
                                                                f"{kernels.unavailable_reason()}")


def model_for(name: str, type_name: str = "Q4_0", **changes):
    config = preset(name).replace(**changes) if changes else preset(name)
    return random_quantized_model(config, type_name, seed=3)


def run_chunks(fast, ids: torch.Tensor, chunk: int, c_prefill: bool, rope_mode: str | None = None):
    """All logits (1, T, V) of `ids` (1, T) fed in chunks of `chunk` tokens (no chunk of 1: that is the decode
    step), and the cache they leave."""
    T = ids.shape[1]
    assert T % chunk != 1
    fast.c_prefill = c_prefill
    try:
        cache = fast.make_cache(1, T + 3)
        with torch.inference_mode():
            logits = torch.cat([fast(ids[:, s:s + chunk], cache, rope_mode=rope_mode) for s in range(0, T, chunk)], 1)
    finally:
        fast.c_prefill = True
    assert cache.length == T
    return logits, cache


def dense_cache(store, scale, kv_dtype: str) -> torch.Tensor:
    """The cache's keys or values (layers, n_kv, capacity, hd) as float64."""
    if isinstance(store, QuantizedKV):
        return store.dequantize().double()
    if kv_dtype == "int8":
        return store.double() * scale.double()[..., None]
    return store.double()


def ids_for(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32000, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,type_name,changes,kv,mode", [
    ("tiny", "Q4_0", {}, "f16", None),
    ("tiny-gqa", "Q8_0", {}, "f16", None),  # grouped-query attention
    ("tiny", "Q4_0", {"sliding_window": 6}, "int8", None),  # the window binds inside and across chunks
    ("tiny-longrope", "Q4_0", {}, "q8_0", "short"),  # LongRoPE: each factor set's cos/sin rows
    ("tiny-longrope", "Q4_0", {}, "q4_0", "long"),
    ("tiny-gqa", "Q4_K", {}, "q4_0", None),  # K-quant weights (q8_K activations)
])
def test_c_prefill_matches_the_pytorch_prefill(name, type_name, changes, kv, mode):
    model = model_for(name, type_name, **changes)
    fast = cpu.accelerate(model, kv)
    assert isinstance(fast, cpu.FastDecoder) and fast.c_prefill
    ids = ids_for(83)
    got, c_cache = run_chunks(fast, ids, 20, True, mode)  # chunks of 20, 20, 20, 20, 3
    want, t_cache = run_chunks(fast, ids, 20, False, mode)
    assert got.shape == want.shape == (1, 83, model.config.vocab_size)
    assert c_cache.rope_mode == t_cache.rope_mode == (mode or model.rope_mode_for(83))
    # the same layers with other float summation orders (RMSNorm, attention) that can flip an 8-bit activation
    # code now and then: close everywhere, not equal
    err = (got - want).abs().amax(-1) / want.abs().amax(-1)  # (1, T) per position
    assert err.max() < 5e-2 and err.median() < 3e-2, err
    cos = torch.nn.functional.cosine_similarity(got[0], want[0], dim=-1)
    assert cos.min() > 0.999, cos.min()
    # the cache both leave: the same keys/values up to those flips (a wrong position, rotation or head would
    # be O(1) off)
    for c_store, t_store, c_scale, t_scale in ((c_cache.k, t_cache.k, c_cache.k_scale, t_cache.k_scale),
                                               (c_cache.v, t_cache.v, c_cache.v_scale, t_cache.v_scale)):
        a = dense_cache(c_store, c_scale, kv)[:, :, :83]
        b = dense_cache(t_store, t_scale, kv)[:, :, :83]
        rel = (a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-6)  # per (layer, head, position)
        assert rel.max() < 0.2 and rel.median() < 1e-2, (rel.max(), rel.median())


def test_chunking_and_threads_do_not_change_a_bit():
    # every row's products, norms and attention are computed alone (key blocks at fixed positions, masked keys
    # exactly 0): the chunk size and the thread count change nothing
    model = model_for("tiny-gqa", "Q4_0", sliding_window=40)
    fast = cpu.accelerate(model, "f16")
    ids = ids_for(150, seed=1)
    whole, cache_w = run_chunks(fast, ids, 150, True)
    old = kernels.get_threads()
    try:
        for chunk, threads in ((7, 2), (64, 1), (33, 2)):
            kernels.set_threads(threads)
            got, cache = run_chunks(fast, ids, chunk, True)
            assert torch.equal(got, whole), (chunk, threads)
            assert torch.equal(cache.k[:, :, :150], cache_w.k[:, :, :150])
            assert torch.equal(cache.v[:, :, :150], cache_w.v[:, :, :150])
    finally:
        kernels.set_threads(old)


def reference_attention(q, k, v, start: int, window: int, group: int) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(hd)) v: q (T, H, hd), k/v (n_kv, L, hd) -> (T, H, hd); query t sees keys
    [max(0, start + t - window + 1), start + t] (window 0: no window)."""
    T, H, hd = q.shape
    L = start + T
    kk = k[:, :L].repeat_interleave(group, 0)  # (H, L, hd)
    vv = v[:, :L].repeat_interleave(group, 0)
    s = torch.einsum("thd,hld->htl", q, kk) / math.sqrt(hd)  # (H, T, L)
    qp = torch.arange(start, L)[:, None]
    kp = torch.arange(L)[None, :]
    visible = kp <= qp
    if window:
        visible &= qp - kp < window
    s = s.masked_fill(~visible, -math.inf)
    return torch.einsum("htl,hld->thd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("kv", ["f16", "int8", "q8_0", "q4_0"])
@pytest.mark.parametrize("H,KV,hd,window", [(4, 4, 64, 0), (6, 2, 96, 0), (3, 1, 32, 50)])
def test_flash_attention_matches_float64_attention(kv, H, KV, hd, window):
    if kv in ("q8_0", "q4_0") and hd % 32:
        pytest.skip("block caches need head_dim % 32 == 0")
    g = torch.Generator().manual_seed(H * 100 + hd)
    config = preset("tiny").replace(hidden_size=H * hd, num_attention_heads=H, num_key_value_heads=KV,
                                    num_hidden_layers=2)
    capacity, start, T = 200, 131, 37  # 168 keys: two whole 64-key blocks and a part; T not a multiple of 16
    cache = cpu.FastKVCache(config, capacity, kv)
    kf = torch.randn(2, KV, capacity, hd, generator=g) * 2
    vf = torch.randn(2, KV, capacity, hd, generator=g)
    if isinstance(cache.k, QuantizedKV):
        cache.k[:, :, :] = kf
        cache.v[:, :, :] = vf
    elif kv == "int8":
        for store, scale, x in ((cache.k, cache.k_scale, kf), (cache.v, cache.v_scale, vf)):
            s = x.abs().amax(-1) / 127.0
            store.copy_(torch.round(x / s[..., None]).to(torch.int8))
            scale.copy_(s)
    else:
        cache.k.copy_(kf)
        cache.v.copy_(vf)
    ldq = (H + 2 * KV) * hd + 5  # q rows with a stride, as the qkv scratch
    q = torch.randn(T, ldq, generator=g) * 2
    att = torch.full((T, H * hd), float("nan"))
    m = cpu._Model(n_layers=2, hidden=H * hd, n_heads=H, n_kv=KV, head_dim=hd, capacity=capacity,
                   kv_type=cpu._KV_TYPE_CODES[kv], k=cpu._codes(cache.k).data_ptr(), v=cpu._codes(cache.v).data_ptr(),
                   k_scale=cache.k_scale.data_ptr() if cache.k_scale is not None else None,
                   v_scale=cache.v_scale.data_ptr() if cache.v_scale is not None else None)
    lib = kernels._load()
    lib.pl_attention.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    rc = lib.pl_attention(ctypes.addressof(m), 1, T, start, window, q.data_ptr(), ldq, att.data_ptr())
    assert rc == 0
    k64 = dense_cache(cache.k, cache.k_scale, kv)[1]
    v64 = dense_cache(cache.v, cache.v_scale, kv)[1]
    want = reference_attention(q[:, :H * hd].double().reshape(T, H, hd), k64, v64, start, window, H // KV)
    err = (att.double().reshape(T, H, hd) - want).abs().max() / want.abs().max()
    assert err < 2e-5, err
    assert lib.pl_attention(ctypes.addressof(m), 1, T, capacity - T + 1, window, q.data_ptr(), ldq,
                            att.data_ptr()) == -1  # past the capacity: refused


def _caches_equal(a, b, n: int) -> bool:
    stores = [(a.k, b.k), (a.v, b.v)]
    if isinstance(a.k, QuantizedKV):
        stores = [(a.k.codes, b.k.codes), (a.v.codes, b.v.codes), (a.k.scales, b.k.scales), (a.v.scales, b.v.scales)]
    elif a.k_scale is not None:
        stores += [(a.k_scale, b.k_scale), (a.v_scale, b.v_scale)]
    return all(torch.equal(x[:, :, :n], y[:, :, :n]) for x, y in stores)


@pytest.mark.parametrize("name,type_name,changes,kv,modes", [
    ("tiny-gqa", "Q4_0", {"sliding_window": 9}, "f16", [None] * 4),
    ("tiny-longrope", "Q8_0", {}, "q8_0", ["short", "long", "short", "long"]),  # rows of both factor sets
    ("tiny-gqa", "Q4_K", {}, "q4_0", [None] * 4),
    ("tiny", "Q4_0", {}, "int8", [None] * 4),
])
def test_several_prompts_in_one_call_equal_each_alone(name, type_name, changes, kv, modes):
    # pl_prefill_segs (the serving engine's batched prefill): the chunks of 4 sequences, of different lengths,
    # some after an earlier chunk in their cache, in one call give each sequence exactly (torch.equal) the logits
    # and keys/values of its chunk alone; with 1 and 2 threads
    model = model_for(name, type_name, **changes)
    fast = cpu.accelerate(model, kv)
    lens, before = (5, 37, 2, 70), (0, 11, 4, 0)  # chunk lengths; tokens already cached
    ids = [ids_for(b + n, seed=10 + i) for i, (b, n) in enumerate(zip(before, lens))]

    def caches():
        out = []
        for i, b in enumerate(before):
            cache = fast.make_cache(1, 100)
            if b:
                with torch.inference_mode():
                    fast.prefill_chunk(ids[i][:, :b], cache, rope_mode=modes[i])
            out.append(cache)
        return out

    alone_caches = caches()
    alone = [fast.prefill_chunk(ids[i][:, before[i]:], alone_caches[i], last_only=True, rope_mode=modes[i])
             for i in range(4)]
    old = kernels.get_threads()
    try:
        for threads in (2, 1):
            kernels.set_threads(threads)
            together_caches = caches()
            got = fast.prefill_chunks([(ids[i][:, before[i]:], together_caches[i], modes[i]) for i in range(4)])
            for i in range(4):
                assert got[i].shape == alone[i].shape == (1, 1, model.config.vocab_size)
                assert torch.equal(got[i], alone[i]), (threads, i)
                assert together_caches[i].length == alone_caches[i].length == before[i] + lens[i]
                assert together_caches[i].rope_mode == alone_caches[i].rope_mode
                assert _caches_equal(together_caches[i], alone_caches[i], before[i] + lens[i]), (threads, i)
    finally:
        kernels.set_threads(old)


def test_several_prompts_bad_item_refused_before_any_cache_is_written():
    model = model_for("tiny-gqa")
    fast = cpu.accelerate(model, "f16")
    good, full = fast.make_cache(1, 20), fast.make_cache(1, 8)
    good.k.zero_()  # (uninitialized memory may hold NaNs, which torch.equal never matches)
    snapshot = good.k.clone()
    with pytest.raises(GenerationError, match="capacity"):
        fast.prefill_chunks([(ids_for(6), good, None), (ids_for(9), full, None)])
    with pytest.raises(GenerationError, match="vocabulary"):
        fast.prefill_chunks([(ids_for(6), good, None), (torch.tensor([[1, 2, 40000]]), full, None)])
    assert good.length == full.length == 0 and torch.equal(good.k, snapshot)
    with pytest.raises(GenerationError, match="cannot store"):
        fast.prefill_chunks([(ids_for(6), good, None), (ids_for(3), object(), None)])


def test_generation_prefills_in_c_and_bad_input_is_refused():
    model = model_for("tiny-longrope")
    tok = pocketlm.Tokenizer.default()
    fast = cpu.accelerate(model, "f16")
    calls = {"n": 0}
    original = fast.prefill_chunk

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    fast.prefill_chunk = counting
    try:
        r = generate_full(model, tok, "Hello there, how are you today? " * 4, max_tokens=3, temperature=0,
                          prefill_chunk_size=16)
    finally:
        del fast.prefill_chunk
    assert r.prompt_tokens > 33 and calls["n"] == -(-r.prompt_tokens // 16)
    cache = fast.make_cache(1, 10)
    with pytest.raises(GenerationError, match="vocabulary"):
        fast(torch.tensor([[1, 2, 40000]]), cache)
    with pytest.raises(GenerationError, match="capacity"):
        fast(torch.tensor([[1] * 11]), cache)
    assert cache.length == 0
    with torch.inference_mode():
        fast(torch.tensor([[1, 2, 3]]), cache, rope_mode="short")
        with pytest.raises(StaleCacheError, match="long"):
            fast(torch.tensor([[4, 5]]), cache, rope_mode="long")
    assert cache.length == 3
