"""Prefix caching, chunked prefill and the KV pool of the batching engine (serve/kvpool.py, serve/batching.py).

- PrefixCache mechanics: exact chain matching, the LongRoPE factor set in a block's identity, LRU eviction of
  leaves only (a chain is never cut in the middle), the match limit.
- Greedy outputs with a shared system prompt equal `generate` alone at batch 1, 7 and 32, with prefix hits
  (and on the GQA, LongRoPE and sliding-window presets, and a quantized model).
- n > 1 prefills its prompt once; seeded choices equal those of an engine without the prefix cache.
- A long prompt prefills in chunks while another stream keeps receiving tokens.
- A full KV pool answers 429 with Retry-After; /metrics reports the prefix cache's hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import time

try:  # the HTTP client openai>=3 depends on; older openai releases use httpx, the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest
import torch

import pocketlm
from pocketlm import Tokenizer, cli
from pocketlm.engine.generate import generate_ids
from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import ConfigError
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app
from pocketlm.serve.batching import Engine, fix_longrope_policy
from pocketlm.serve.commands import add_arguments
from pocketlm.serve.kvpool import PrefixCache
from pocketlm.serve.schemas import Limits, parse_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


SYSTEM = [1] + [(i * 7919) % 31000 + 500 for i in range(100)]  # 101 ids: 3 full 32-token blocks


def _gen(model, tok, prompt_ids, max_tokens, ctx, **extra):
    return parse_request({"model": "m", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, **extra},
                         "completion", tokenizer=tok, model_names=["m"], limits=Limits(max_n=4, context_length=ctx),
                         vocab_size=model.config.vocab_size)


def _run(engine, gens, *, timeout=120, events=None):
    """Submit GenRequests at once; return per request {choice index: [token ids]} plus each token's arrival
    (`events`: a list that receives each request's list of events)."""
    async def main():
        loop = asyncio.get_running_loop()

        async def one(gen):
            q = asyncio.Queue()
            engine.submit(gen, loop, q)
            ids, times = {}, []
            if events is not None:
                events.append([])
                seen = events[-1]
            while True:
                ev = await asyncio.wait_for(q.get(), timeout)
                if events is not None:
                    seen.append(ev)
                assert ev["type"] != "error", ev
                if ev["type"] == "done":
                    return ids, times
                if "token" in ev:
                    ids.setdefault(ev["index"], []).append(ev["token"])
                    times.append(time.perf_counter())
        return await asyncio.gather(*[one(g) for g in gens])
    return asyncio.run(main())


def _alone(model, tok, prompt_ids, max_tokens):
    return list(generate_ids(model, prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens),
                             stop_token_ids=[tok.eos_id], vocab_limit=len(tok)))


def _prompts(n):
    """n prompts sharing SYSTEM, with distinct tails of 3..(3 + n % 40) tokens (some end on a block boundary)."""
    return [SYSTEM + [(j * 131 + i * 17) % 30000 + 700 for j in range(3 + (i * 5) % 40)] for i in range(n)]


# ---- PrefixCache alone ------------------------------------------------------------------------------------------

def _filled_cache(model, ids):
    kv = model.make_cache(1, len(ids))
    model(torch.tensor([ids]), kv)
    return kv


def test_prefix_cache_matches_exact_chains_and_modes():
    model = pocketlm.load("tiny")
    ids = SYSTEM[:96]
    pc = PrefixCache(model.config, max_blocks=16, block_size=32)
    assert pc.insert(ids, "default", _filled_cache(model, ids)) == 3
    kv = model.make_cache(1, 200)
    assert pc.match(ids + [5, 6], "default", 97, kv) == 96
    assert kv.length == 96 and kv.rope_mode == "default"
    ref = _filled_cache(model, ids)
    assert torch.equal(kv.k[:, :, :, :96], ref.k) and torch.equal(kv.v[:, :, :, :96], ref.v)
    # the limit keeps at least one token to compute; another factor set or a changed token never matches
    assert pc.match(ids, "default", 95, model.make_cache(1, 96)) == 64
    assert pc.match(ids, "long", 96, model.make_cache(1, 96)) == 0
    changed = ids[:40] + [ids[40] + 1] + ids[41:]
    assert pc.match(changed, "default", 96, model.make_cache(1, 96)) == 32
    s = pc.stats()
    assert s["prefix_hit_tokens"] == 96 + 64 + 32 and s["prefix_blocks"] == 3


def test_prefix_cache_evicts_lru_leaves_only():
    model = pocketlm.load("tiny")
    pc = PrefixCache(model.config, max_blocks=3, block_size=32)
    a = SYSTEM[:96]
    b = [2] + SYSTEM[1:64]
    pc.insert(a, "default", _filled_cache(model, a))  # the chain a0 <- a1 <- a2 fills the cache
    # b0 (a new root) evicts the only leaf, a2; b1 then evicts a1 (now a leaf) and never its pinned parent b0
    assert pc.insert(b, "default", _filled_cache(model, b)) == 2
    assert len(pc) == 3 and pc.stats()["prefix_evictions"] == 2
    assert pc.match(a, "default", 96, model.make_cache(1, 96)) == 32  # the root a0 survived its children
    assert pc.match(b, "default", 64, model.make_cache(1, 64)) == 64
    pc.match(a, "default", 96, model.make_cache(1, 96))  # a0 is now the most recently used
    assert pc.insert(a[:64], "default", _filled_cache(model, a[:64])) == 1  # a1 back: evicts b1 (LRU leaf)
    assert pc.match(b, "default", 64, model.make_cache(1, 64)) == 32
    with pytest.raises(ConfigError, match="block_size"):
        PrefixCache(model.config, max_blocks=4, block_size=0)


# ---- the engine: exact outputs with prefix hits ---------------------------------------------------------------------

@pytest.mark.parametrize("batch, prefix", [(1, True), (7, True), (32, True), (7, False), (32, False)])
def test_shared_prefix_greedy_equals_generate_alone(tok, batch, prefix):
    """With the cache: the later prompts reuse the first one's 96 system tokens (and arrive together: their tails
    prefill in one batched forward). Without: every prompt is prefilled whole, batched."""
    model = pocketlm.load("tiny")
    ctx = 256
    engine = Engine(model, tok, max_slots=batch, max_queue=64, context_length=ctx, prefix_cache=prefix)
    try:
        prompts = _prompts(batch if batch > 1 else 3)
        gens = [_gen(model, tok, p, 6, ctx) for p in prompts]
        if batch == 1:  # one at a time: the second and third prompts hit the first one's blocks
            out = [_run(engine, [g])[0] for g in gens]
        else:
            out = _run(engine, [gens[0]]) + _run(engine, gens[1:])  # the first one fills the cache
        for p, (ids, _) in zip(prompts, out):
            assert ids[0] == _alone(model, tok, p, 6)
        s = engine.stats()
        assert s.get("prefix_hit_tokens") == (96 * (len(prompts) - 1) if prefix else None)
        assert s["active"] == 0 and s["kv_reserved_tokens"] == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("preset, ctx", [("tiny-gqa", 256), ("tiny-longrope", 256), ("tiny-longrope", 2304)])
def test_prefix_hits_on_gqa_and_longrope_presets(tok, preset, ctx):
    model = pocketlm.load(preset)
    policy = fix_longrope_policy(model, ctx)
    engine = Engine(model, tok, max_slots=4, max_queue=8, context_length=ctx)
    try:
        prompts = _prompts(4)
        out = _run(engine, [_gen(model, tok, prompts[0], 5, ctx)]) + _run(
            engine, [_gen(model, tok, p, 5, ctx) for p in prompts[1:]])
        for p, (ids, _) in zip(prompts, out):
            assert ids[0] == _alone(model, tok, p, 5)
        assert engine.stats()["prefix_hit_tokens"] == 96 * 3
        if policy is not None:  # every block carries the factor set the server pinned
            assert {b.key[1] for b in engine.prefix._blocks.values()} == {policy}
    finally:
        engine.shutdown()


def test_prefix_hit_across_the_sliding_window(tok):
    """tiny's 2048-key window: a 2100-token prompt whose first 2080 positions come from the cache generates
    across the window exactly as generate alone does."""
    model = pocketlm.load("tiny")
    ctx = 2304
    engine = Engine(model, tok, max_slots=2, max_queue=4, context_length=ctx)
    try:
        base = [1] + [(i * 7919) % 31000 + 500 for i in range(2090)]
        first, second = base[:2085], base + [600, 601, 602, 603, 604, 605, 606, 607, 608]
        _run(engine, [_gen(model, tok, first, 1, ctx)])
        (ids, _), = _run(engine, [_gen(model, tok, second, 12, ctx)])
        assert ids[0] == _alone(model, tok, second, 12)
        assert engine.stats()["prefix_hit_tokens"] == 2080
    finally:
        engine.shutdown()


def test_quantized_model_prefix_hits_equal_generate(tok, tmp_path):
    from pocketlm.quant.gguf_export import export_gguf

    path = tmp_path / "q.gguf"
    export_gguf(pocketlm.load("tiny"), path, tokenizer=tok, scheme="q4_0", keep_embeddings="f16")
    model = pocketlm.load(path)
    engine = Engine(model, tok, max_slots=4, max_queue=8, context_length=256)
    try:
        prompts = _prompts(3)
        out = _run(engine, [_gen(model, tok, prompts[0], 5, 256)]) + _run(
            engine, [_gen(model, tok, p, 5, 256) for p in prompts[1:]])
        for p, (ids, _) in zip(prompts, out):
            assert ids[0] == _alone(model, tok, p, 5)
        assert engine.stats()["prefix_hit_tokens"] == 96 * 2
        assert engine.c_decode_steps > 0  # the decode steps ran on the batched C step (engine/cpu_batch.py)
    finally:
        engine.shutdown()


def test_kernels_resume_from_a_hit_off_the_chunk_grid_and_equal_generate(tok):
    """On the kernels a prompt resumed from a prefix hit is not cut at generate's chunk grid (pl_prefill computes
    every row alone), and every reply still equals generate alone with the same chunk size: token ids, and the
    first token's log-probability to the last bit. tiny-gqa's decode step and a prefill row differ in float
    rounding, so the last prompt token must be computed as generate computes it: in a prefill chunk (the hit
    stops two tokens short), or alone where generate's last chunk is one token (length % chunk == 1)."""
    from pocketlm.config import preset
    from pocketlm.engine import cpu
    from pocketlm.engine.generate import prefill
    from pocketlm.quant import kernels
    from pocketlm.quant.random_model import random_quantized_model

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    model = random_quantized_model(preset("tiny-gqa"), "Q8_0", seed=3)
    chunk, ctx = 40, 256
    first = SYSTEM + [(j * 97) % 30000 + 700 for j in range(99)]  # 200 ids: fills blocks 0..5 (192 positions)
    other = SYSTEM + [(j * 89) % 30000 + 900 for j in range(36)]  # 137 ids sharing only SYSTEM (hit 96)
    # hits of 128 of 129, 192 of 193 or 96 of 97 would leave the last token to a one-token step (generate: a
    # prefill row; at 193 the two differ): the hits stop at 96, 160 and 64; 161 % 40 == 1: generate computes the
    # last token alone, so does the engine (hit 160); 122: [96, 122) in one chunk (the grid: [96, 120) and
    # [120, 122)); 137 from 96: [96, 135) and [135, 137), never a one-token chunk
    prompts = [first[:129], first[:161], first[:122], first[:137], other, first[:193], first[:97]]
    engine = Engine(model, tok, max_slots=8, max_queue=8, context_length=ctx, prefill_chunk_size=chunk)
    chunks = []
    planned = engine._prefill_forward

    def record(work):
        chunks.extend((len(w.seq.prompt), w.start, w.end) for w in work)
        return planned(work)
    engine._prefill_forward = record
    try:
        assert engine.fast is not None
        _run(engine, [_gen(model, tok, first, 1, ctx)])
        events = []
        out = _run(engine, [_gen(model, tok, p, 5, ctx, logprobs=1) for p in prompts], events=events)
        fast = cpu.accelerate(model)
        for p, (ids, _), evs in zip(prompts, out, events):
            assert ids[0] == _alone(model, tok, p, 5), len(p)
            with torch.inference_mode():
                logits = prefill(fast, fast.make_cache(1, len(p)), p, chunk_size=chunk).float()
                logits[engine.vocab_limit:] = float("-inf")
            token = ids[0][0]
            assert token == int(logits.argmax())
            first = next(e for e in evs if e.get("token") == token)
            assert first["logprob"] == float(torch.log_softmax(logits, -1)[token]), len(p)
        firsts = {}
        for n, start, end in chunks:
            firsts.setdefault(n, (start, end))
        assert firsts[129] == (96, 129) and firsts[161] == (160, 161) and firsts[122] == (96, 122)
        assert firsts[137] in ((128, 137), (96, 135))  # first[:137] hits 128; `other` hits 96 and stops at 135
        assert sorted((s, e) for n, s, e in chunks if n == 137) == [(96, 135), (128, 137), (135, 137)]
        assert firsts[193] == (160, 193) and firsts[97] == (64, 97)
        assert engine.stats()["prefix_hit_tokens"] == 96 + 160 + 96 + 128 + 96 + 160 + 64
    finally:
        engine.shutdown()


def test_n_choices_prefill_once_and_equal_without_cache(tok):
    model = pocketlm.load("tiny")
    prompt = SYSTEM + [800, 801, 802]
    results = []
    for prefix in (True, False):
        engine = Engine(model, tok, max_slots=4, max_queue=8, context_length=256, prefix_cache=prefix)
        try:
            gen = _gen(model, tok, prompt, 8, 256, n=3, temperature=0.9, seed=7)
            (ids, _), = _run(engine, [gen])
            results.append(ids)
            if prefix:  # one lookup (one prefill) for the three choices
                s = engine.stats()
                assert s["prefix_miss_tokens"] == len(prompt) and s["prefix_hit_tokens"] == 0
            else:
                assert "prefix_hit_tokens" not in engine.stats()
        finally:
            engine.shutdown()
    assert results[0] == results[1] and len(results[0]) == 3


# ---- chunked prefill ------------------------------------------------------------------------------------------------

def test_long_prompt_prefills_in_chunks_while_a_stream_decodes(tok):
    """A 1000-token prompt in 128-token chunks: the running stream gets a token after every chunk, so its largest
    gap is a fraction of the whole prefill."""
    model = pocketlm.load("tiny")
    ctx = 1200
    engine = Engine(model, tok, max_slots=2, max_queue=4, context_length=ctx, prefill_chunk_size=128)
    long_ids = [1] + [(i * 104729) % 30000 + 600 for i in range(999)]
    short = _gen(model, tok, [1, 500, 501, 502], 60, ctx)
    try:
        async def main():
            loop = asyncio.get_running_loop()
            qs, ql = asyncio.Queue(), asyncio.Queue()
            engine.submit(short, loop, qs)
            first = await asyncio.wait_for(qs.get(), 60)  # the short stream is decoding
            assert first["type"] == "token"
            short_times = []

            async def drain_short():
                while (ev := await asyncio.wait_for(qs.get(), 60))["type"] != "done":
                    assert ev["type"] == "token", ev
                    short_times.append(time.perf_counter())

            async def long_first_token():
                t0 = time.perf_counter()
                engine.submit(_gen(model, tok, long_ids, 2, ctx), loop, ql)
                ev = await asyncio.wait_for(ql.get(), 60)
                assert ev["type"] == "token", ev
                t1 = time.perf_counter()
                while (await asyncio.wait_for(ql.get(), 60))["type"] != "done":
                    pass
                return t0, t1

            _, (t0, t1) = await asyncio.gather(drain_short(), long_first_token())
            return short_times, t0, t1

        short_times, t0, t1 = asyncio.run(main())
        during = [t for t in short_times if t0 <= t <= t1]
        # 1000 tokens in 128-token chunks: 8 prefill steps, each followed by a decode step of the short stream
        assert len(during) >= 5, (len(during), t1 - t0)
        gaps = [b - a for a, b in zip([t0] + during, during + [t1])]
        assert max(gaps) < 0.6 * (t1 - t0), (max(gaps), t1 - t0)
    finally:
        engine.shutdown()


def test_batched_prefill_of_distinct_prompts_equals_generate_alone(tok):
    """Seven different prompts (no shared block, cache off) arrive together: their prefills share one batched,
    left-padded forward and each reply equals generate alone."""
    model = pocketlm.load("tiny-gqa")
    engine = Engine(model, tok, max_slots=7, max_queue=8, context_length=256, prefix_cache=False)
    try:
        prompts = [[1] + [(j * 37 + i * 1009) % 30000 + 600 for j in range(4 + 9 * i)] for i in range(7)]
        prefill_rows = []
        forward_batched = model.forward_batched

        def counting(ids, *args, **kwargs):
            if ids.shape[1] > 1:  # a prefill (decode steps feed one id per row)
                prefill_rows.append(ids.shape[0])
            return forward_batched(ids, *args, **kwargs)

        model.forward_batched = counting
        out = _run(engine, [_gen(model, tok, p, 6, 256) for p in prompts])
        for p, (ids, _) in zip(prompts, out):
            assert ids[0] == _alone(model, tok, p, 6)
        assert prefill_rows and max(prefill_rows) >= 3, prefill_rows  # prompts that arrived together: one forward
    finally:
        engine.shutdown()


def test_prompts_arriving_together_compute_a_shared_block_once(tok):
    """Two new prompts with the same uncached 64-token head in one step: the second waits a step and takes the
    first one's blocks instead of computing them too."""
    model = pocketlm.load("tiny")
    engine = Engine(model, tok, max_slots=2, max_queue=4, context_length=256)
    try:
        head = SYSTEM[:64]
        prompts = [head + [700, 701, 702], head + [800, 801, 802, 803]]
        out = _run(engine, [_gen(model, tok, p, 4, 256) for p in prompts])
        for p, (ids, _) in zip(prompts, out):
            assert ids[0] == _alone(model, tok, p, 4)
        s = engine.stats()
        assert s["prefix_hit_tokens"] == 64 and s["prefix_miss_tokens"] == 67 + 4
    finally:
        engine.shutdown()


# ---- HTTP: the KV pool and /metrics --------------------------------------------------------------------------------

def test_full_kv_pool_is_429_with_retry_after_and_metrics_report_hits(tok):
    model = pocketlm.load("tiny")
    with pytest.raises(ConfigError, match="kv_pool_tokens"):
        Engine(model, tok, context_length=256, kv_pool_tokens=100)
    app = create_app(model, tok, ServerConfig(model_name="m", context_length=512, kv_pool_tokens=512))
    system = "You answer in one word. " * 12
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        def chat(user, max_tokens, stream=False):
            return {"model": "m", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                    "logit_bias": {"32000": -100, "32001": -100, "32007": -100},
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        with client.stream("POST", "/v1/chat/completions", json=chat("first", 300, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the stream is running
            busy = client.post("/v1/chat/completions", json=chat("second", 250))
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "2"
            assert busy.json()["error"]["code"] == "rate_limit_exceeded" and "KV cache pool" in busy.text
            ollama = client.post("/api/generate", json={"model": "m", "prompt": "x", "stream": False,
                                                          "options": {"num_predict": 150}})
            assert ollama.status_code == 429 and "Retry-After" in ollama.headers
            text = "".join(lines)
        assert text.endswith("[DONE]") and '"finish_reason":"length"' in text.replace(" ", "")  # not truncated
        ok = client.post("/v1/chat/completions", json=chat("second", 250))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 250
        metrics = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("pocketlm_prefix_cache_") or line.startswith("pocketlm_kv_pool")}
    assert values["pocketlm_prefix_cache_hit_tokens_total"] > 0  # the second chat reused the system prompt
    rate = values["pocketlm_prefix_cache_hit_tokens_total"] / (values["pocketlm_prefix_cache_hit_tokens_total"]
                                                                + values["pocketlm_prefix_cache_miss_tokens_total"])
    assert values["pocketlm_prefix_cache_hit_rate"] == pytest.approx(rate, abs=1e-6)
    assert values["pocketlm_kv_pool_tokens"] == 512 and values["pocketlm_kv_pool_reserved_tokens"] == 0


def test_resent_conversation_reuses_prompt_and_reply(tok):
    """Turn 2 of a chat resends turn 1's prompt and reply: their blocks (the reply's from the slot row) are reused,
    and the turn-2 reply equals generate alone."""
    model = pocketlm.load("tiny")
    engine = Engine(model, tok, max_slots=2, max_queue=4, context_length=512)
    try:
        turn1 = SYSTEM[:70]
        (ids1, _), = _run(engine, [_gen(model, tok, turn1, 60, 512)])
        reply = ids1[0]
        assert len(reply) == 60 and reply == _alone(model, tok, turn1, 60)
        turn2 = turn1 + reply + [900, 901, 902]
        hits0 = engine.stats()["prefix_hit_tokens"]
        (ids2, _), = _run(engine, [_gen(model, tok, turn2, 8, 512)])
        assert ids2[0] == _alone(model, tok, turn2, 8)
        # turn 1 held 70 + 59 fed ids: 4 full blocks (128 positions), 64 of them from the prompt's own prefill
        assert engine.stats()["prefix_hit_tokens"] - hits0 == 128
    finally:
        engine.shutdown()


def test_cli_flags(capsys):
    assert cli.main(["serve", "tiny", "--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk 0 must be >= 1" in capsys.readouterr().err
    assert cli.main(["serve", "tiny", "--prefix-cache-tokens", "-1"]) == 2
    assert "--prefix-cache-tokens -1 must be >= 0" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--no-prefix-cache", "--kv-pool-tokens", "4096", "--prefill-chunk", "128"])
    assert (a.prefix_cache, a.kv_pool_tokens, a.prefill_chunk, a.prefix_cache_tokens) == (False, 4096, 128, None)


def test_default_prefix_cache_size_follows_memory(tok):
    model = pocketlm.load("tiny")
    engine = Engine(model, tok, max_slots=1, context_length=128)
    try:
        per_token = engine.prefix.block_bytes / engine.prefix.block_size
        assert engine.prefix.max_blocks * 32 == min(8192, int(512 * 2**20 // per_token) // 32 * 32)
    finally:
        engine.shutdown()
    engine = Engine(model, tok, max_slots=1, context_length=128, prefix_cache_tokens=16)
    try:
        assert engine.prefix is None and "prefix_hit_tokens" not in engine.stats()  # less than a block: off
    finally:
        engine.shutdown()
