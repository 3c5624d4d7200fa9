"""One whole decoded token in C (quant/kernels.c pl_decode_token, engine/cpu.py FastDecoder): the embedding row,
the layers, the final RMSNorm, lm_head and the greedy argmax, against the older split (layers in C, the rest in
PyTorch) and against linear.py's dequantizers."""

from __future__ import annotations

import ctypes

import pytest
import torch
from torch import nn

import pocketlm
from pocketlm.config import preset
from pocketlm.engine import cpu
from pocketlm.engine.generate import generate_full, generate_ids
from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import GenerationError
from pocketlm.quant import codecs, kernels
from pocketlm.quant.linear import QuantizedLinear, dequantize_torch
from pocketlm.quant.random_model import random_quantized_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: "
                                                                f"{kernels.unavailable_reason()}")

# f16 fields of each block (byte offsets) that get random finite scales; the rest of a block is random codes
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2), "IQ4_NL": (0,),
                 "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_rows(type_name: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """GGUF bytes (rows, row bytes) of `type_name`: random codes, a random f16 scale (+-0.0005..0.02) per field."""
    g = torch.Generator().manual_seed(seed)
    block, size = codecs.BLOCK[type_name]
    raw = torch.randint(0, 256, (rows, cols // block, size), dtype=torch.uint8, generator=g)
    for o in SCALE_OFFSETS[type_name]:
        mag = torch.rand(rows, cols // block, generator=g) * 0.02 + 5e-4
        sign = torch.where(torch.rand(rows, cols // block, generator=g) < 0.3, -1.0, 1.0)
        raw[..., o:o + 2] = (mag * sign).half().view(torch.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def c_row(table: torch.Tensor, code: int, tiles: int, cols: int, row: int) -> torch.Tensor:
    out = torch.empty(cols)
    rc = kernels._load().pl_embed_row(table.data_ptr(), code, tiles, cols, row, out.data_ptr())
    assert rc == 0
    return out


@pytest.mark.parametrize("type_name", sorted(kernels.KINDS))
def test_embedding_rows_equal_the_torch_dequantizer_bit_for_bit(type_name):
    rows, cols = 37, 512  # rows not a multiple of the 16-row tile; two 256-column super-blocks
    raw = random_rows(type_name, rows, cols, seed=len(type_name))
    want = dequantize_torch(raw, type_name, (rows, cols))
    packed = kernels.pack(raw, type_name, rows, cols)  # the tile layout a tied lm_head keeps
    for r in (0, 5, 15, 16, 36):
        assert torch.equal(c_row(raw, kernels.KINDS[type_name], 0, cols, r), want[r]), (type_name, r, "gguf")
        assert torch.equal(c_row(packed, kernels.KINDS[type_name], 1, cols, r), want[r]), (type_name, r, "tiles")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_embedding_rows(dtype):
    table = (torch.randn(9, 96, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    code = cpu._FLOAT_TABLE_TYPES[dtype]
    for r in (0, 4, 8):
        assert torch.equal(c_row(table, code, 0, 96, r), table[r].float())


def model_for(type_name: str, tied: bool, name: str = "tiny", seed: int = 3):
    config = preset(name).replace(tie_word_embeddings=tied)
    return random_quantized_model(config, type_name, seed=seed)


def twin_decoders(model):
    new, old = cpu.FastDecoder(model), cpu.FastDecoder(model)
    old.full_step = False
    return new, old


def run_steps(fast, ids: list[int], steps: int):
    """Prefill ids, then decode greedily `steps` tokens; (logits of each step, the ids, the cache)."""
    cache = fast.make_cache(1, len(ids) + steps + 1)
    with torch.inference_mode():
        logits = fast(torch.tensor([ids]), cache, last_only=True)[0, -1]
    out, seq = [], []
    for _ in range(steps):
        token = int(torch.argmax(logits))
        seq.append(token)
        with torch.inference_mode():
            logits = fast(torch.tensor([[token]]), cache, last_only=True)[0, -1]
        out.append(logits.clone())
    return out, seq, cache


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("tied", [True, False])
def test_whole_token_in_c_matches_the_split_path(type_name, tied):
    model = model_for(type_name, tied)
    new, old = twin_decoders(model)
    ids = torch.randint(0, 32000, (10,), generator=torch.Generator().manual_seed(7)).tolist()
    got, seq_new, cache_new = run_steps(new, ids, 8)
    want, seq_old, cache_old = run_steps(old, ids, 8)
    assert seq_new == seq_old  # identical greedy tokens
    # the same embedding row (bit for bit) and rotary rows: the caches are identical
    n = cache_new.length
    assert n == cache_old.length == len(ids) + 8
    assert torch.equal(cache_new.k[:, :, :n], cache_old.k[:, :, :n])
    assert torch.equal(cache_new.v[:, :, :n], cache_old.v[:, :, :n])
    # logits: the final RMSNorm's summation order differs (C vs torch); lm_head's 8-bit activation codes may flip
    errs = [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]
    assert sorted(errs)[len(errs) // 2] < 1e-4 and max(errs) < 2e-2, errs
    assert new.python_embed_steps == 0 and new.python_head_steps == 0


def test_greedy_generation_never_runs_the_python_embedding_or_lm_head():
    model = model_for("Q4_0", tied=True)
    fast = cpu.accelerate(model)
    assert isinstance(fast, cpu.FastDecoder) and fast.full_step
    calls = {"embed": 0, "head": 0, "argmax": 0}
    argmax = fast.decode_argmax

    def counting(*a, **k):
        calls["argmax"] += 1
        return argmax(*a, **k)

    fast.decode_argmax = counting
    hooks = [model.model.embed_tokens.register_forward_hook(lambda *a: calls.__setitem__("embed", calls["embed"] + 1)),
             model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    try:
        params = SamplingParams(temperature=0, max_tokens=10)
        ids = list(generate_ids(model, [1, 15043, 29892, 920], params))
    finally:
        for h in hooks:
            h.remove()
    assert len(ids) == 10
    # the prompt pass only; the 9 decoded tokens ran wholly in C, the greedy ids picked there
    assert calls == {"embed": 1, "head": 1, "argmax": 9}
    del fast.decode_argmax
    assert fast.python_embed_steps == 0 and fast.python_head_steps == 0
    fast.full_step = False  # the older split: the same ids, the embedding and lm_head in PyTorch per token
    try:
        assert list(generate_ids(model, [1, 15043, 29892, 920], params)) == ids
    finally:
        fast.full_step = True


def test_sampling_and_penalties_read_the_c_logits_with_the_same_results():
    model = model_for("Q8_0", tied=False)
    fast = cpu.accelerate(model)
    tok = pocketlm.Tokenizer.default()
    for settings in ({"temperature": 0.9, "top_p": 0.9, "seed": 5}, {"temperature": 0.7, "top_k": 40, "seed": 1},
                     {"temperature": 0, "repetition_penalty": 1.3}):
        fast.full_step = True
        a = generate_full(model, tok, "Hello there", max_tokens=12, **settings)
        fast.full_step = False
        b = generate_full(model, tok, "Hello there", max_tokens=12, **settings)
        fast.full_step = True
        assert a.token_ids == b.token_ids, settings
    assert fast.python_embed_steps == 0 and fast.python_head_steps == 0


def test_argmax_over_a_vocabulary_limit():
    model = model_for("Q4_0", tied=True)
    fast = cpu.FastDecoder(model)
    ids = [5, 6, 7, 8]
    caches = [fast.make_cache(1, 8) for _ in range(4)]
    with torch.inference_mode():
        for c in caches:
            fast(torch.tensor([ids]), c)
    logits = fast.decode_logits(9, caches[0]).clone()
    best = int(torch.argmax(logits))
    assert 2 < best < fast.vocab - 1
    assert fast.decode_argmax(9, caches[1]) == best
    assert fast.decode_argmax(9, caches[2], best + 1) == best  # the best id is the last one allowed
    assert fast.decode_argmax(9, caches[3], best) == int(torch.argmax(logits[:best]))  # excluded
    assert all(c.length == 5 for c in caches)


def test_one_and_two_threads_give_identical_logits_and_ids():
    model = model_for("Q4_K", tied=True)
    fast = cpu.FastDecoder(model)
    old = kernels.get_threads()
    outs = []
    try:
        for n in (1, 2, 1):
            kernels.set_threads(n)
            logits, seq, _ = run_steps(fast, [3, 4, 5, 6, 7], 4)
            outs.append((torch.stack(logits), seq))
    finally:
        kernels.set_threads(old)
    assert all(torch.equal(outs[0][0], o[0]) and outs[0][1] == o[1] for o in outs[1:])


def test_fallbacks_keep_the_results(monkeypatch):
    # an lm_head not on the kernels (float) and an embedding C does not read: Python runs those parts only
    model = model_for("Q4_0", tied=False)
    want, seq_want, _ = run_steps(cpu.FastDecoder(model), [9, 10, 11], 5)
    w = QuantizedLinear.dequantized(model.lm_head)
    model.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False)
    model.lm_head.weight = nn.Parameter(w)
    monkeypatch.setattr(cpu, "embedding_table", lambda embed: None)
    fast = cpu.FastDecoder(model)
    got, seq, _ = run_steps(fast, [9, 10, 11], 5)
    assert fast.python_embed_steps == 5 and fast.python_head_steps == 5
    assert seq == seq_want  # float lm_head vs the kernels' 8-bit activations: close, the same greedy ids
    errs = [((g - x).abs().max() / x.abs().max()).item() for g, x in zip(got, want)]
    assert max(errs) < 5e-2, errs


def test_bad_tokens_and_a_full_cache_are_refused():
    fast = cpu.FastDecoder(model_for("Q4_0", tied=True))
    cache = fast.make_cache(1, 2)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        fast.decode_argmax(fast.config.vocab_size, cache)
    fast.decode_argmax(3, cache)
    fast.decode_argmax(4, cache)
    with pytest.raises(GenerationError, match="capacity"):
        fast.decode_argmax(5, cache)
    # the C entry checks the row itself too
    lib = kernels._load()
    rc = lib.pl_decode_token(fast._addr_m, fast._addr_head, -1, 0, 0, None, None, 0)
    assert rc == -2
    assert ctypes.sizeof(cpu._Head) == 8 + 4 * 3 + 4 + 8 + ctypes.sizeof(cpu._Mat) + 3 * 8 + 4 + 4


@pytest.mark.parametrize("settings", [{"temperature": 0.8, "top_p": 0.9}, {"temperature": 1.2, "top_k": 50},
                                      {"temperature": 0.6, "min_p": 0.05, "repetition_penalty": 1.2}])
def test_sampling_on_one_torch_thread_draws_the_same_ids(settings):
    # the decode loop samples a FastDecoder's logits with torch on one thread: the same ids as on two
    from pocketlm.engine.sampling import make_generator, sample
    params = SamplingParams(seed=11, **settings)
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(2)) * 4
    old = torch.get_num_threads()
    draws = []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            g = make_generator(params)
            draws.append([sample(logits, params, g, seen_ids=[1, 2, 3]) for _ in range(20)])
    finally:
        torch.set_num_threads(old)
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
