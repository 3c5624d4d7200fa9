"""Batched decode on the CPU kernels (quant/kernels.c pl_decode_batch, engine/cpu_batch.py, serve/batching.py).

- One C call for B rows of a slot cache gives each row exactly (torch.equal) the logits of that row's step alone
  (B = 1) and of `FastDecoder`'s single-sequence C step (for the cache types both have: f16, int8, q8_0, q4_0);
  and logits within 0.03 (max) / 5e-3 (mean) absolute of the PyTorch single-sequence forward with a KVCache of
  the same type (see ATOL; logits of magnitude ~1.6) - rows
  that join at different steps, on the MHA, GQA and sliding-window structures, Q8_0 and Q4_K weights, every
  cache type, LongRoPE with rows of both factor sets in one batch.
- 1 and 2 kernel threads give identical logits; the same checks pass under POCKETLM_KERNEL_ISA=avx2 and =scalar.
- Through the serving engine: greedy outputs equal `generate` alone at batch 1, 7 and 32 (shared prefix, prefix
  hits) with the decode steps on the C path and the prompts that arrive together prefilled in shared C calls,
  for quantized caches, GQA, LongRoPE and the sliding window.
- The idle engine gives freed heap pages back once after serving (batching.TRIM_INTERVAL_S).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pocketlm
from pocketlm import Tokenizer
from pocketlm.config import preset
from pocketlm.engine import cpu
from pocketlm.engine.cpu_batch import BatchDecoder
from pocketlm.engine.generate import generate_ids
from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import GenerationError
from pocketlm.formats import hf
from pocketlm.quant import kernels
from pocketlm.quant.linear import quantize_model
from pocketlm.serve.batching import Engine, SlotKVCache, fix_longrope_policy
from pocketlm.serve.schemas import Limits, parse_request

pytestmark = [pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable"),
              pytest.mark.usefixtures("one_torch_thread")]

# C step vs the PyTorch forward (random tiny models: logits of magnitude ~1.6). f32, int8 and q4_0 caches come
# out bit-equal here; with f16 (the C step rounds queries to f16, as llama.cpp) and q8_0 (block-wise dot
# products) a last-bit difference can flip an int8 activation code downstream: max 0.016, mean 0.003 measured.
ATOL, MEAN_TOL = 0.03, 5e-3


STEPS, STARTS = 14, (0, 3, 6, 1)  # row r decodes from step STARTS[r]: rows join the batch at different steps
SMALL_VOCAB = 1024  # the direct step tests need no tokenizer: a small lm_head keeps them cheap


@functools.lru_cache(maxsize=None)
def kernel_model(name: str, scheme: str = "q8_0", window: int | None = None, vocab: int | None = None,
                 heads: tuple[int, int] | None = None):
    """A random `name` preset quantized to `scheme` (on the kernels); `window`: its sliding_window changed;
    `vocab`: its vocabulary size changed; `heads`: (query heads, key/value heads) of head_dim 64 instead."""
    config = preset(name)
    if window is not None:
        config = config.replace(sliding_window=window)
    if vocab is not None:
        config = config.replace(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if heads is not None:
        config = config.replace(hidden_size=64 * heads[0], num_attention_heads=heads[0], num_key_value_heads=heads[1])
    model = hf.init_weights(hf.empty_model(config, torch.float32), seed=0)
    model = quantize_model(model, scheme).eval()
    assert cpu.eligible(model)
    return model


def _tokens(model):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (len(STARTS), STEPS), generator=g).tolist()


def _run_batched(model, kv, modes, toks, slot_perm=(2, 0, 3, 1)):
    """All active rows in one C call per step, at permuted slots (not 0..B-1); {(row, position): logits}."""
    bd = BatchDecoder(model)
    cache = SlotKVCache(model.config, 4, 256, torch.float32, "cpu", kv)
    cache.ensure(STEPS)
    out = {}
    for t in range(STEPS):
        rows = [r for r in range(len(STARTS)) if t >= STARTS[r]]
        logits = bd.step([toks[r][t - STARTS[r]] for r in rows], [slot_perm[r] for r in rows],
                         [t - STARTS[r] for r in rows], cache, [modes[r] for r in rows])  # (B, 1, vocab)
        for i, r in enumerate(rows):
            out[r, t - STARTS[r]] = logits[i, 0].clone()  # the decoder's buffer: kept past the step
    return out


def _check_rows(model, kv, modes):
    """Each row of the batched run equals: the row alone (B = 1, exact), FastDecoder's single-sequence C step
    (exact; f16/int8/q8_0/q4_0) and the PyTorch forward with a KVCache of the same type (ATOL, MEAN_TOL)."""
    toks = _tokens(model)
    batched = _run_batched(model, kv, modes, toks)
    bd = BatchDecoder(model)
    for r in range(len(STARTS)):
        n = STEPS - STARTS[r]
        alone = SlotKVCache(model.config, 1, 256, torch.float32, "cpu", kv)
        alone.ensure(n)
        fast = cpu.FastDecoder(model, kv) if kv in cpu.KV_DTYPES else None
        fcache = fast.make_cache(1, n) if fast else None
        model.kv_cache_type = kv
        try:
            ref_cache = model.make_cache(1, n)
        finally:
            model.kv_cache_type = None
        for p in range(n):
            ids = [toks[r][p]]
            got = batched[r, p]
            assert torch.equal(got, bd.step(ids, [0], [p], alone, [modes[r]])[0, 0]), (r, p)
            if fast is not None:
                assert torch.equal(got, fast(torch.tensor([ids]), fcache, rope_mode=modes[r])[0, 0]), (r, p)
            ref = model(torch.tensor([ids]), ref_cache, rope_mode=modes[r])[0, 0]
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
            assert (got - ref).abs().mean() < MEAN_TOL, (r, p)


@pytest.mark.parametrize("name, scheme, window, kv", [
    ("tiny", "q8_0", None, None), ("tiny", "q8_0", None, "f16"), ("tiny", "q8_0", None, "int8"),
    ("tiny", "q8_0", None, "q8_0"), ("tiny", "q8_0", None, "q4_0"), ("tiny-gqa", "q8_0", None, None),
    ("tiny-gqa", "q4_k", None, "q4_0"), ("tiny", "q8_0", 6, None), ("tiny-gqa", "q8_0", 6, "f16")])
def test_step_rows_equal_alone_fastdecoder_and_torch(name, scheme, window, kv):
    """window 6: a row sees its last 7 keys, so rows of up to 14 positions decode across the window."""
    _check_rows(kernel_model(name, scheme, window, SMALL_VOCAB), kv, ["default"] * 4)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
@pytest.mark.parametrize("heads, window", [((3, 1), None), ((6, 2), 6), ((4, 1), None), ((5, 1), None)],
                         ids=["3-per-kv", "3-per-kv-window6", "4-per-kv", "5-per-kv"])
def test_step_rows_of_grouped_query_heads(heads, window, kv):
    """3 and 4 query heads per key/value head (the default model and SmolLM2 have 3): with an f16 or q8_0 cache
    the batched step reads each key once for its group's heads (kernels.c attention_group); 5 per group takes the
    per-head path. Every row is still exactly its step alone and FastDecoder's."""
    _check_rows(kernel_model("tiny-gqa", "q8_0", window, SMALL_VOCAB, heads), kv, ["default"] * 4)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
@pytest.mark.parametrize("heads", [(3, 1), (4, 1)], ids=["3-per-kv", "4-per-kv"])
def test_grouped_attention_outputs_equal_fastdecoders_bit_for_bit(heads, kv):
    """The attention output itself (the last layer's, before o_proj), batched against FastDecoder row by row: the
    logits above hide most last-bit differences (the output's int8 activation codes seldom flip), so a changed
    rounding in attention_group (an fmadd for a mul and an add, say) shows here and not there. Early steps take the
    grouped jobs (few keys: serial), later ones the per-head jobs."""
    model = kernel_model("tiny-gqa", "q8_0", None, SMALL_VOCAB, heads)
    steps = 40
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, model.config.vocab_size, (len(STARTS), steps), generator=g).tolist()
    bd = BatchDecoder(model)
    cache = SlotKVCache(model.config, 4, 256, torch.float32, "cpu", kv)
    cache.ensure(steps)
    fast = [cpu.FastDecoder(model, kv) for _ in STARTS]
    fcache = [f.make_cache(1, steps) for f in fast]
    compared = 0
    for t in range(steps):
        rows = [r for r in range(len(STARTS)) if t >= STARTS[r]]
        bd.step([toks[r][t - STARTS[r]] for r in rows], [(2, 0, 3, 1)[r] for r in rows],
                [t - STARTS[r] for r in rows], cache, ["default"] * len(rows))
        att = bd._scratch["att"][:len(rows)].clone()  # (B, H * hd): the last layer's attention rows
        for i, r in enumerate(rows):
            fast[r](torch.tensor([[toks[r][t - STARTS[r]]]]), fcache[r], rope_mode="default")
            assert torch.equal(att[i], fast[r]._scratch["att"]), (kv, r, t)
            compared += 1
    assert compared == sum(steps - s for s in STARTS)


@pytest.mark.parametrize("kv", [None, "f16"])
def test_step_longrope_rows_of_both_factor_sets(kv):
    model = kernel_model("tiny-longrope", vocab=SMALL_VOCAB)
    _check_rows(model, kv, ["short", "long", "long", "short"])
    toks = _tokens(model)  # the factor set changes the logits: both sets are really used
    a = _run_batched(model, kv, ["short"] * 4, toks)
    b = _run_batched(model, kv, ["long"] * 4, toks)
    assert not torch.allclose(a[0, 5], b[0, 5], atol=1e-3)


def test_step_one_and_two_threads_identical():
    model = kernel_model("tiny-gqa", vocab=SMALL_VOCAB)
    old = kernels.get_threads()
    try:
        runs = []
        for n in (1, 2):
            kernels.set_threads(n)
            runs.append(_run_batched(model, "q8_0", ["default"] * 4, _tokens(model)))
    finally:
        kernels.set_threads(old)
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_step_refuses_bad_rows_and_unsupported_caches():
    model = kernel_model("tiny", vocab=SMALL_VOCAB)
    bd = BatchDecoder(model)
    cache = SlotKVCache(model.config, 2, 64, torch.float32, "cpu")
    cache.ensure(8)
    with pytest.raises(GenerationError, match="outside"):
        bd.step([5], [2], [0], cache)  # no slot 2
    with pytest.raises(GenerationError, match="outside"):
        bd.step([5], [0], [256], cache)  # past the capacity
    with pytest.raises(GenerationError, match="vocabulary"):
        bd.step([SMALL_VOCAB], [0], [0], cache)
    assert not bd.supports(SlotKVCache(model.config, 2, 64, torch.bfloat16, "cpu"))
    assert BatchDecoder.for_model(pocketlm.load("tiny")) is None  # float linears: the PyTorch path


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_step_checks_under_forced_isa(isa):
    """The exactness checks above (Q8_0 and Q4_K/Q6_K weights; f32 and q4_0 caches; GQA) with the kernels built
    for a forced instruction set, in a fresh process."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, kernels.ISA_ENV: isa}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
                        "-k", "(step_rows and (tiny-q8_0-None-None or q4_k or 3-per-kv-window6)) or "
                              "attention_outputs"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "8 passed" in r.stdout, r.stdout[-500:]


# ---- through the serving engine ------------------------------------------------------------------------------------

SYSTEM = [1] + [(i * 7919) % 31000 + 500 for i in range(100)]  # 101 ids: 3 full 32-token blocks


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _prompts(n):
    return [SYSTEM + [(j * 131 + i * 17) % 30000 + 700 for j in range(3 + (i * 5) % 40)] for i in range(n)]


def _gen(model, tok, prompt_ids, max_tokens, ctx):
    return parse_request({"model": "m", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0},
                         "completion", tokenizer=tok, model_names=["m"], limits=Limits(max_n=4, context_length=ctx),
                         vocab_size=model.config.vocab_size)


def _run(engine, gens, timeout=120):
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()

        async def one(gen):
            q = asyncio.Queue()
            engine.submit(gen, loop, q)
            ids = []
            while (ev := await asyncio.wait_for(q.get(), timeout))["type"] != "done":
                assert ev["type"] == "token", ev
                ids.append(ev["token"])
            return ids
        return await asyncio.gather(*[one(g) for g in gens])
    return asyncio.run(main())


def _serve_equals_alone(model, tok, kv, batch, ctx=256, max_tokens=6, prompts=None):
    """Greedy ids through the engine (the first prompt alone, then the rest at once: prefix hits) equal
    `generate` alone with the C decoder on the same cache type (kv None: f16, both defaults)."""
    model.kv_cache_type = kv  # the engine's slot, prefill and prefix caches
    fast_kv = kv or "f16"  # the engine keeps a kernel model's default cache in f16, as generate does
    engine = Engine(model, tok, max_slots=batch, max_queue=64, context_length=ctx)
    try:
        assert engine.batch_decoder is not None
        prompts = prompts or _prompts(max(batch, 2))
        gens = [_gen(model, tok, p, max_tokens, ctx) for p in prompts]
        out = _run(engine, gens[:1]) + _run(engine, gens[1:]) if batch > 1 else [_run(engine, [g])[0] for g in gens]
        assert engine.c_decode_steps >= max_tokens - 1
        assert engine.c_prefill_chunks > 0  # prompt chunks prefill in C, as in generate
        if batch > 2:  # prompts arriving together share C prefill calls (pl_prefill_segs)
            assert engine.c_prefill_calls < engine.c_prefill_chunks, (engine.c_prefill_calls, engine.c_prefill_chunks)
        s = engine.stats()
        assert s["active"] == 0 and s["prefix_hit_tokens"] > 0
    finally:
        engine.shutdown()
        model.kv_cache_type = None
    cpu.accelerate(model, fast_kv)  # generate's decoder: this cache type
    try:
        for p, ids in zip(prompts, out):
            assert ids == list(generate_ids(model, p, SamplingParams(temperature=0, max_tokens=max_tokens),
                                            stop_token_ids=[tok.eos_id], vocab_limit=len(tok)))
    finally:
        cpu.accelerate(model, "f16")


@pytest.mark.parametrize("batch, kv", [(1, None), (7, None), (32, None), (7, "f16"), (7, "q4_0"), (7, "int8")])
def test_engine_greedy_equals_generate_alone(tok, batch, kv):
    _serve_equals_alone(kernel_model("tiny"), tok, kv, batch)


@pytest.mark.parametrize("name, window, ctx", [("tiny-gqa", None, 256), ("tiny", 20, 256),
                                               ("tiny-longrope", None, 256), ("tiny-longrope", None, 4200)])
def test_engine_structures_equal_generate_alone(tok, name, window, ctx):
    """window 20: prompts of 104..143 tokens decode with a 21-key window; tiny-longrope at ctx 4200: the server
    pins the long factor set (fix_longrope_policy), short at 256."""
    model = kernel_model(name, "q8_0", window)
    config = model.config
    try:
        policy = fix_longrope_policy(model, ctx)
        assert policy == (None if name != "tiny-longrope" else "long" if ctx > 4096 else "short")
        _serve_equals_alone(model, tok, "q8_0" if name == "tiny-gqa" else None, 4, ctx=ctx)
    finally:
        model.config = config


def test_engine_trims_the_heap_once_idle(tok, monkeypatch):
    """After serving, the idle engine calls malloc_trim once (not again while nothing runs): the soak's RSS."""
    from pocketlm.serve import batching

    calls = []
    monkeypatch.setattr(batching, "release_free_memory", lambda: calls.append(1))
    monkeypatch.setattr(batching, "TRIM_INTERVAL_S", 0.0)
    model = kernel_model("tiny")
    engine = Engine(model, tok, max_slots=2, max_queue=4, context_length=256)
    try:
        time.sleep(0.6)
        assert calls == []  # nothing served yet: no trim
        _run(engine, [_gen(model, tok, [1, 500, 501], 3, 256)])
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.2)  # two more idle waits: still one trim
        assert calls == [1]
    finally:
        engine.shutdown()
