"""The fast CPU decode path (engine/cpu.py + quant/kernels.c pl_decode_step) against the PyTorch model."""

from __future__ import annotations

import copy

import pytest
import torch

import pocketlm
from pocketlm.config import preset
from pocketlm.engine import cpu
from pocketlm.engine.generate import generate_full
from pocketlm.errors import GenerationError, StaleCacheError
from pocketlm.quant import kernels
from pocketlm.quant.random_model import random_quantized_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: "
                                                                f"{kernels.unavailable_reason()}")


def model_for(name: str, type_name: str = "Q4_0", **changes):
    config = preset(name).replace(**changes) if changes else preset(name)
    return random_quantized_model(config, type_name, seed=3)


def step_errors(model, kv: str, prompt: int = 12, steps: int = 10, seed: int = 0) -> list[float]:
    """Relative max logit error of each C decode step against the PyTorch step on an identical cache."""
    fast = cpu.accelerate(model, kv)
    assert isinstance(fast, cpu.FastDecoder)
    ids = torch.randint(0, 32000, (1, prompt + steps), generator=torch.Generator().manual_seed(seed))
    errs = []
    with torch.inference_mode():
        cache = fast.make_cache(1, prompt + steps)
        fast(ids[:, :prompt], cache)  # prompt through the PyTorch model, stored in the fast cache
        for t in range(prompt, prompt + steps):
            twin = copy.deepcopy(cache)
            want = model(ids[:, t:t + 1], twin, last_only=True)  # PyTorch path, same cache contents
            got = fast(ids[:, t:t + 1], cache, last_only=True)  # C path
            assert got.shape == want.shape == (1, 1, model.config.vocab_size)
            assert cache.length == twin.length == t + 1
            errs.append(((got - want).abs().max() / want.abs().max()).item())
    return errs


@pytest.mark.parametrize("name,type_name,changes", [
    ("tiny", "Q4_0", {}),
    ("tiny-gqa", "Q8_0", {}),  # grouped-query attention
    ("tiny", "Q4_0", {"sliding_window": 6}),  # the window binds during decoding
    ("tiny-longrope", "Q4_0", {}),
])
def test_c_decode_step_matches_pytorch_step(name, type_name, changes):
    model = model_for(name, type_name, **changes)
    # int8 cache: both paths read the same dequantized keys; the only differences are float summation orders,
    # which can flip one 8-bit activation code now and then (a ~1e-2 step): most steps must be exact-ish
    errs = step_errors(model, "int8")
    assert sorted(errs)[len(errs) // 2] < 1e-4 and max(errs) < 5e-2, errs
    # f16 cache: the C path also rounds queries to f16 (as llama.cpp): small differences everywhere
    errs = step_errors(model, "f16")
    assert max(errs) < 5e-2, errs


def test_q4_1_model_decodes_like_pytorch(tmp_path):
    # Q4_1 (SmolLM2's type): min/max blocks of a float model's weights, w = d * q + m
    from pocketlm.quant.linear import QuantizedLinear, set_module
    model = pocketlm.load("tiny", seed=2)
    for layer in model.model.layers:
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            w = layer.get_submodule(name).weight.detach()
            b = w.reshape(w.shape[0], -1, 32)
            lo, hi = b.amin(-1), b.amax(-1)
            d = ((hi - lo) / 15).half()
            m = lo.half()
            q = torch.round((b - m.float()[..., None]) / d.float()[..., None].clamp_min(1e-8)).clamp(0, 15).to(torch.uint8)
            qs = q[..., :16] | (q[..., 16:] << 4)
            raw = torch.cat([d.view(torch.uint8).reshape(*d.shape, 2), m.view(torch.uint8).reshape(*m.shape, 2), qs], -1)
            set_module(layer, name, QuantizedLinear(raw.reshape(w.shape[0], -1), "Q4_1", w.shape[1]))
    errs = step_errors(model, "int8")
    assert sorted(errs)[len(errs) // 2] < 1e-4 and max(errs) < 5e-2, errs


def test_threads_do_not_change_the_result():
    model = model_for("tiny")
    fast = cpu.accelerate(model, "f16")
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    outs = []
    old = kernels.get_threads()
    try:
        for n in (1, 2, 1):
            kernels.set_threads(n)
            cache = fast.make_cache(1, 8)
            with torch.inference_mode():
                fast(ids[:, :4], cache)
                outs.append(fast(ids[:, 4:], cache, last_only=True))
    finally:
        kernels.set_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_generation_uses_the_fast_path_and_stops():
    model = model_for("tiny")
    tok = pocketlm.Tokenizer.default()
    calls = {"n": 0}
    fast = cpu.accelerate(model)
    original = fast._run_token  # pl_decode_token: one C call per decoded token

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    fast._run_token = counting
    r = generate_full(model, tok, "Hello", max_tokens=6, temperature=0)
    assert r.completion_tokens == 6 and calls["n"] == 5  # the first token comes from the prompt pass
    assert r.decode_tokens_per_s > 0


def test_longrope_boundary_resets_and_prefills():
    model = model_for("tiny-longrope")
    fast = cpu.accelerate(model, "f16")
    n = model.config.original_max_position_embeddings
    cache = fast.make_cache(1, n + 2)
    cache.length, cache.rope_mode = n, "short"  # a full short-factor cache
    with pytest.raises(StaleCacheError, match="long"):
        fast(torch.tensor([[5]]), cache)  # position n+1 needs the long factors
    with pytest.raises(GenerationError, match="capacity"):
        small = fast.make_cache(1, 2)
        small.length = 2
        fast(torch.tensor([[5]]), small)


def test_float_models_are_not_accelerated_and_bad_kv_type_is_refused():
    model = pocketlm.load("tiny")
    assert not cpu.eligible(model) and cpu.accelerate(model) is model
    with pytest.raises(GenerationError, match="fp8"):
        cpu.accelerate(model_for("tiny"), "fp8")


def test_kv_cache_sizes():
    c = preset("phi-3-mini-4k")
    assert cpu.kv_cache_bytes(c, 4096, "f16") == 2 * 32 * 32 * 4096 * 96 * 2  # 1.61 GB
    assert cpu.kv_cache_bytes(c, 4096, "int8") == 2 * 32 * 32 * 4096 * 96 + 8 * 32 * 32 * 4096
    small = model_for("tiny")
    cache = cpu.accelerate(small, "int8").make_cache(1, 64)
    assert cache.nbytes() == cpu.kv_cache_bytes(small.config, 64, "int8")


def test_cli_kv_cache_option(tmp_path, capsys):
    from pocketlm.cli import main
    from pocketlm.quant.gguf_export import export_gguf
    path = tmp_path / "t.gguf"
    export_gguf(model_for("tiny"), path)
    assert main(["run", str(path), "Hi", "--raw", "--max-tokens", "3", "--kv-cache", "int8", "--verbose"]) == 0
    assert "eval rate" in capsys.readouterr().err
    float_path = tmp_path / "f.gguf"
    export_gguf(pocketlm.load("tiny"), float_path)
    # a float model keeps its keys/values in the PyTorch KVCache of that type (pocketlm.kvcache); the C engine
    # has no f32 cache
    assert main(["run", str(float_path), "Hi", "--raw", "--max-tokens", "2", "--kv-cache", "int8"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "Hi", "--raw", "--max-tokens", "2", "--kv-cache", "f32"]) == 2
    assert "CPU kernels" in capsys.readouterr().err
