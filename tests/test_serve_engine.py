"""The batching engine without HTTP: slot cache mechanics, staggered requests (non-contiguous rows) equal to
`generate` alone, the LongRoPE serving policy, and the `pocketlm serve` verb as a real process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

try:  # the HTTP client openai>=3 depends on; older openai releases use httpx, the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import openai
import pytest
import torch

import pocketlm
from pocketlm import Tokenizer, cli
from pocketlm.engine.generate import generate_full
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app
from pocketlm.serve.batching import Engine, SlotKVCache
from pocketlm.serve.schemas import Limits, parse_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_slot_cache_rows_at_their_own_positions():
    model = pocketlm.load("tiny")
    c = model.config
    cache = SlotKVCache(c, slots=3, max_len=600, dtype=torch.float32, device="cpu")
    assert cache.capacity == 0
    kv = model.make_cache(1, 5)
    model(torch.tensor([[1, 2, 3, 4, 5]]), kv)
    cache.load(2, kv, 5)
    assert cache.capacity == 256 and torch.equal(cache.k[:, 2, :, :5], kv.k[:, 0, :, :5])
    cache.begin([2, 0], [5, 300])  # non-contiguous rows, far apart: grows to 512
    assert cache.capacity == 512 and not cache.contiguous and cache.L == 301
    k = torch.randn(2, c.num_key_value_heads, 1, c.head_dim)
    k_all, v_all = cache.update(0, k, k)
    assert k_all.shape == (2, c.num_key_value_heads, 301, c.head_dim)
    assert torch.equal(k_all[0, :, 5], k[0, :, 0]) and torch.equal(k_all[1, :, 300], k[1, :, 0])
    assert torch.equal(k_all[0, :, :5], kv.k[0, 0, :, :5])


def _run(engine, gens):
    """Submit GenRequests (some after a delay) straight to the engine; return each one's text per choice."""
    async def main():
        loop = asyncio.get_running_loop()

        async def one(gen, delay):
            await asyncio.sleep(delay)
            q = asyncio.Queue()
            engine.submit(gen, loop, q)
            texts = {}
            while True:
                ev = await asyncio.wait_for(q.get(), 60)
                assert ev["type"] != "error", ev
                if ev["type"] == "done":
                    return texts
                texts[ev["index"]] = texts.get(ev["index"], "") + ev["text"]
        return await asyncio.gather(*[one(g, d) for g, d in gens])
    return asyncio.run(main())


def test_staggered_requests_equal_generate_alone():
    model, tok = pocketlm.load("tiny"), Tokenizer.default()
    engine = Engine(model, tok, max_slots=4, max_queue=16, context_length=512)
    try:
        limits = Limits(max_n=4, context_length=512)
        cases = [(f"Prompt number {i} " * (1 + i % 3), 5 + 7 * i) for i in range(8)]
        gens = [(parse_request({"model": "m", "messages": [{"role": "user", "content": p}], "max_tokens": m,
                                "temperature": 0}, "chat", tokenizer=tok, model_names=["m"], limits=limits,
                               vocab_size=model.config.vocab_size), 0.03 * i) for i, (p, m) in enumerate(cases)]
        out = _run(engine, gens)
        for (p, m), texts in zip(cases, out):
            assert texts[0] == generate_full(model, tok, [{"role": "user", "content": p}], max_tokens=m,
                                             temperature=0).text
        s = engine.stats()
        assert s["active"] == 0 and s["waiting"] == 0 and s["free_slots"] == 4
    finally:
        engine.shutdown()


def test_long_prompt_chunked_prefill_and_sliding_window_equal_generate():
    """A 2040-token prompt (four 512-token prefill chunks, interleaved with another row's decode steps) that
    generates across the tiny preset's 2048-key sliding window, next to a short request."""
    model, tok = pocketlm.load("tiny"), Tokenizer.default()
    assert model.config.attention_window == 2048
    engine = Engine(model, tok, max_slots=2, max_queue=4, context_length=2304)
    try:
        limits = Limits(max_n=2, context_length=2304)
        long_ids = [1] + [(i * 7919) % 31000 + 500 for i in range(2039)]
        gens = [(parse_request({"model": "m", "prompt": long_ids, "max_tokens": 30, "temperature": 0},
                               "completion", tokenizer=tok, model_names=["m"], limits=limits,
                               vocab_size=model.config.vocab_size), 0.0),
                (parse_request({"model": "m", "prompt": "Short one", "max_tokens": 40, "temperature": 0},
                               "completion", tokenizer=tok, model_names=["m"], limits=limits,
                               vocab_size=model.config.vocab_size), 0.0)]
        out = _run(engine, gens)
        from pocketlm.engine.generate import generate_ids
        from pocketlm.engine.sampling import SamplingParams
        ids = list(generate_ids(model, long_ids, SamplingParams(temperature=0, max_tokens=30),
                                stop_token_ids=[tok.eos_id], vocab_limit=len(tok)))
        assert len(long_ids) + len(ids) > 2048 + 1, "the reply must cross the sliding window"
        assert out[0][0] == tok.decode([i for i in ids if i != tok.eos_id], skip_special=True)
        assert out[1][0] == generate_full(model, tok, "Short one", max_tokens=40, temperature=0).text
    finally:
        engine.shutdown()


@pytest.mark.parametrize("context, policy", [(2048, "short"), (8192, "long")])
def test_longrope_policy_fixed_from_context(context, policy):
    model, tok = pocketlm.load("tiny-longrope"), Tokenizer.default()
    app = create_app(model, tok, ServerConfig(model_name="lr", max_slots=2, context_length=context))
    assert app.state.longrope_policy == policy and model.config.longrope_policy == policy
    assert model.rope_mode_for(10) == policy  # one factor set for every batch, whatever the lengths
    msgs = [{"role": "user", "content": "hello there"}]
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="lr", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == generate_full(model, tok, msgs, max_tokens=12, temperature=0).text


def test_cli_rejects_bad_limits_before_loading(capsys):
    assert cli.main(["serve", "tiny", "--max-slots", "0"]) == 2
    assert "--max-slots 0 must be >= 1" in capsys.readouterr().err


def test_cli_serve_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm.cli", "serve", "tiny", "--port", str(port),
                             "--threads", "1", "--context-length", "256", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # bounded: 60 s
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "tiny"
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode is not None


def test_bfloat16_model_serves_text_and_json():
    model, tok = pocketlm.load("tiny", dtype="bfloat16"), Tokenizer.default()
    app = create_app(model, tok, ServerConfig(model_name="tiny", max_slots=2, context_length=256))
    assert app.state.engine.cache.dtype == torch.bfloat16
    msgs = [{"role": "user", "content": "hi"}]
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True)
        assert r.choices[0].message.content == generate_full(model, tok, msgs, max_tokens=8, temperature=0).text
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0.7, seed=1,
                                           response_format={"type": "json_object"})
        assert r.choices[0].message.content.lstrip().startswith("{")
