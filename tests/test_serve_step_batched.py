"""The serving engine's per-step work done for the whole batch at once (serve/batching.py `_accept_rows`,
engine/cpu_batch.py, quant/kernels.c `pl_argmax_rows`, engine/detok.py's memo).

- `argmax_rows` (C) equals torch.argmax row by row: strided rows of a padded buffer, ties (the lowest index),
  NaN (the first NaN), all -inf rows, -0.0 against 0.0, lengths that end off the vector width.
- Through the engine, the batched decode-step picks (every row's logit_bias in one indexed add, the plain greedy
  rows in one argmax) equal the per-row path (`_choose` for every row) for a batch that mixes plain greedy rows,
  greedy rows with logit_bias, presence/frequency penalties and seeded sampling with logit_bias, n > 1.
- The batched step's cos/sin rows (a table per LongRoPE mode) equal `model.rotary_emb` at the same positions,
  across table blocks.
- IncrementalDecoder with a shared memo returns exactly the pieces it returns without one.
Run also under POCKETLM_KERNEL_ISA=avx2 and =scalar (the C argmax has one path per ISA).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from pocketlm import Tokenizer
from pocketlm.config import preset
from pocketlm.engine.cpu_batch import BatchDecoder, argmax_rows
from pocketlm.engine.detok import IncrementalDecoder
from pocketlm.formats import hf
from pocketlm.quant import kernels
from pocketlm.quant.linear import quantize_model
from pocketlm.serve.batching import Engine
from pocketlm.serve.schemas import Limits, parse_request

pytestmark = [pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable"),
              pytest.mark.usefixtures("one_torch_thread")]


# ---- argmax_rows -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("V", [1, 7, 16, 33, 1000, 32064])
def test_argmax_rows_equals_torch(V):
    g = torch.Generator().manual_seed(V)
    buf = torch.randn(12, V + 21, generator=g)  # padded rows: stride V + 21, as the decoder's logits buffer
    x = buf[:, :V]
    x[1] = -math.inf  # all -inf: index 0
    if V > 3:
        x[2, V // 2] = x[2, V - 1] = x[2].max() + 1  # a tie: the lower index
        x[3, 3] = math.nan  # NaN counts as the largest
        x[4, V - 1] = math.nan
        x[4, 1] = math.nan  # the first NaN
        x[5] = 0.0
        x[5, 2] = -0.0  # -0.0 == 0.0: index 0 still first
        x[6, :] = -math.inf
        x[6, V - 1] = 5.0  # the maximum in the tail past the last full vector
        x[7, V - 2] = math.inf
    want = torch.argmax(x, dim=-1).tolist()
    assert argmax_rows(x) == want
    assert argmax_rows(x[3:9]) == want[3:9]
    assert argmax_rows(x[[0, 2, 5]]) == [want[0], want[2], want[5]]  # a contiguous copy


# ---- the engine's batched picks against the per-row path ------------------------------------------------------------

VOCAB = 512  # the rope test's model: no tokenizer needed


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _tiny_kernel_model():
    """The `tiny` preset (the default tokenizer's vocabulary), random weights, Q8_0 on the kernels."""
    model = hf.init_weights(hf.empty_model(preset("tiny"), torch.float32), seed=0)
    return quantize_model(model, "q8_0").eval()


def _requests(model, tok):
    base = {"model": "m", "max_tokens": 9}
    bodies = [
        {**base, "prompt": [1, 1700, 3300, 800], "temperature": 0},
        {**base, "prompt": [1, 4000, 4100], "temperature": 0, "logit_bias": {"777": 100}},  # 777 every step
        {**base, "prompt": [1, 900, 900, 900, 1200], "temperature": 0, "logit_bias": {"300": -100, "400": 2.5, "1100": 1.25}},
        {**base, "prompt": [1, 2000, 300], "temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 0.5,
         "logit_bias": {"500": 0.75}},
        {**base, "prompt": [1, 500, 600, 700], "temperature": 0.9, "seed": 11, "n": 2, "logit_bias": {"600": 3.0}},
        {**base, "prompt": [1, 3000, 3010, 3020, 3030, 3040], "temperature": 0, "n": 2},
        # greedy with a repetition penalty (the default model declares 1.2): penalty and pick batched
        {**base, "prompt": [1, 1700, 3300, 800], "temperature": 0, "repetition_penalty": 1.3},
        {**base, "prompt": [1, 2500, 2500, 2600], "temperature": 0, "repetition_penalty": 0.7, "n": 2},
        {**base, "prompt": [1, 4000, 4100], "temperature": 0, "repetition_penalty": 1.3,
         "logit_bias": {"4100": 3.0, "900": 1.5}},
        # logprobs are of the unpenalized logits: this row is penalized on a copy
        {**base, "prompt": [1, 1700, 3300, 800], "temperature": 0, "repetition_penalty": 1.3, "logprobs": 2},
    ]
    limits = Limits(max_n=4, context_length=64)
    return [parse_request(b, "completion", tokenizer=tok, model_names=["m"], limits=limits,
                          vocab_size=model.config.vocab_size) for b in bodies]


def _serve(engine, gens, logprobs=None):
    """{choice index: tokens} per request; `logprobs`: a list that gets each token event's logprob (or None)."""
    async def main():
        loop = asyncio.get_running_loop()

        async def one(gen):
            q = asyncio.Queue()
            engine.submit(gen, loop, q)
            out: dict[int, list[int]] = {}
            while (ev := await asyncio.wait_for(q.get(), 60))["type"] != "done":
                assert ev["type"] == "token", ev
                out.setdefault(ev["index"], []).append(ev["token"])
                if logprobs is not None:
                    logprobs.append(ev.get("logprob"))
            return out
        return await asyncio.gather(*[one(g) for g in gens])
    return asyncio.run(main())


def _per_row(self, rows, logits):
    """The reference: every row through `_choose` alone (bias, penalties, argmax or sampling on the row)."""
    for i, seq in enumerate(rows):
        seq.length += 1
        self._guarded_accept(seq, logits[i])


def test_batched_picks_equal_per_row(monkeypatch, tok):
    model = _tiny_kernel_model()
    outs, steps, logprobs = [], [], [[], []]
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(Engine, "_accept_rows", _per_row)
        engine = Engine(model, tok, max_slots=16, max_queue=16, context_length=64, prefix_cache=False)
        try:
            assert engine.batch_decoder is not None
            gens = _requests(model, tok)
            outs.append(_serve(engine, gens[:-1]) + _serve(engine, gens[-1:], logprobs[not batched]))
            steps.append(engine.c_decode_steps)
        finally:
            engine.shutdown()
    assert steps[0] > 0 and steps[1] > 0
    assert outs[0] == outs[1]
    assert logprobs[0] == logprobs[1] and None not in logprobs[0] and len(logprobs[0]) == 9
    assert outs[0][1][0] == [777] * 9  # the +100 bias was applied on every decode step
    assert 300 not in outs[0][2][0]
    assert outs[0][4][0] != outs[0][4][1]  # two seeded choices: their own generators
    assert outs[0][6][0] != outs[0][0][0]  # the same prompt as request 0: the penalty changed the reply


def test_penalized_rows_are_picked_in_the_batch(monkeypatch, tok):
    """Greedy rows whose only processing is a repetition penalty never reach the per-row sampler."""
    import pocketlm.serve.batching as batching
    model = _tiny_kernel_model()
    calls = []
    real = batching.sample
    monkeypatch.setattr(batching, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = Engine(model, tok, max_slots=16, max_queue=16, context_length=64, prefix_cache=False)
    try:
        gens = [g for g in _requests(model, tok)
                if g.params[0].repetition_penalty != 1.0 and not g.logit_bias and not g.logprobs]
        assert len(gens) == 2
        out = _serve(engine, gens)
    finally:
        engine.shutdown()
    assert [len(o) for o in out] == [1, 2] and all(len(t) == 9 for o in out for t in o.values())
    assert len(calls) == 3  # only each sequence's first token, picked after its prefill


# ---- the batched step's inputs -------------------------------------------------------------------------------------

def test_rope_rows_equal_rotary_emb():
    model = hf.init_weights(hf.empty_model(preset("tiny-longrope").replace(vocab_size=VOCAB, bos_token_id=1,
                                                                          eos_token_id=2, pad_token_id=2),
                                           torch.float32), seed=0)
    bd = BatchDecoder(quantize_model(model, "q8_0").eval())
    for mode in ("short", "long"):
        pos = torch.tensor([0, 5, 255, 256, 700, 1023, 3])
        cos, sin = bd._rope_rows(mode, pos, int(pos.max()), len(pos))
        ref_cos, ref_sin = model.rotary_emb(pos, mode, torch.float32)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_detok_memo_gives_the_same_pieces():
    tok = Tokenizer.default()
    ids = tok.encode("Grüße, 世界! 🙂 The quick brown fox — jumps; naïve café. 🙂🙂")
    memo: dict = {}
    for _ in range(2):  # the second pass is served from the memo
        plain, shared = IncrementalDecoder(tok, skip_special=True), IncrementalDecoder(tok, skip_special=True,
                                                                                        memo=memo)
        a = [plain.push(i) for i in ids] + [plain.flush()]
        b = [shared.push(i) for i in ids] + [shared.flush()]
        assert a == b and "".join(a) == tok.decode(ids)
    assert memo and all(len(k) <= IncrementalDecoder.MEMO_WINDOW for k in memo)


def test_logit_bias_reaches_greedy_rows_of_a_bfloat16_model(tok):
    """bfloat16 logits (a float model on the PyTorch path): the batch does not add logit_bias in place, so a
    greedy row with a bias (plain or penalized) takes the per-row path, which adds it."""
    model = hf.init_weights(hf.empty_model(preset("tiny"), torch.bfloat16), seed=0).eval()
    engine = Engine(model, tok, max_slots=4, max_queue=4, context_length=64, prefix_cache=False)
    limits = Limits(max_n=1, context_length=64)
    bodies = [{"model": "m", "max_tokens": 5, "prompt": [1, 1700, 3300], "temperature": 0, "logit_bias": {"777": 100}},
              {"model": "m", "max_tokens": 5, "prompt": [1, 1700, 3300], "temperature": 0, "logit_bias": {"777": 100},
               "repetition_penalty": 1.3}]
    try:
        gens = [parse_request(b, "completion", tokenizer=tok, model_names=["m"], limits=limits,
                              vocab_size=model.config.vocab_size) for b in bodies]
        out = _serve(engine, gens)
    finally:
        engine.shutdown()
    assert out[0][0] == [777] * 5
    assert out[1][0][0] == 777  # then the penalty (777 seen) against the bias: +100 still wins at 1.3
