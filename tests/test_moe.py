"""phi-3.5-MoE: config.json in/out, parameter counts, SparseMixer routing, and parity with transformers'
PhimoeForCausalLM (fp32, CPU) through the checkpoint layout in both directions.

transformers 5.x's PhimoeRotaryEmbedding switches the magnitude (short_mscale / long_mscale) at the LongRoPE
boundary but recomputes the inverse frequencies without the sequence length, so past 4096 tokens it rotates with
the *short* factors; the released reference code (and transformers 4.x, which passed `seq_len`) use the long
factors there. The long-side parity test corrects that one call in the reference and checks that the unpatched
reference differs, so the test still catches either factor set being wrong on our side.
"""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch

import pocketlm
from pocketlm.config import Phi3Config, preset
from pocketlm.errors import ConfigError
from pocketlm.formats import hf
from pocketlm.model import Phi3ForCausalLM
from pocketlm.moe import load_balancing_loss, sparsemixer_route

transformers = pytest.importorskip("transformers")
from transformers.models.phimoe import modeling_phimoe  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
TOL = 1e-4

# microsoft/Phi-3.5-MoE-instruct config.json, every architecture key as released (the 64-entry LongRoPE factor
# lists are stand-ins here: their exact values do not change any shape or count checked below)
RELEASED = {
    "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "attention_bias": True,
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu",
    "hidden_dropout": 0.0, "hidden_size": 4096, "initializer_range": 0.02, "input_jitter_noise": 0.01,
    "intermediate_size": 6400, "lm_head_bias": True, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 16, "original_max_position_embeddings": 4096, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32064,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 64 for i in range(64)],
                     "long_factor": [1.0 + i / 4 for i in range(64)], "short_mscale": 1.243163121016122,
                     "long_mscale": 1.243163121016122, "original_max_position_embeddings": 4096},
}


def small(**changes) -> Phi3Config:
    """tiny-moe with a 512-row vocabulary (fast reference models)."""
    return preset("tiny-moe").replace(vocab_size=512, eos_token_id=2, **changes)


# ---- config ----------------------------------------------------------------------------------------------------

def test_released_config_round_trip():
    c = Phi3Config.from_hf_dict(RELEASED)
    assert (c.num_local_experts, c.num_experts_per_tok, c.router_jitter_noise, c.input_jitter_noise) == (16, 2, 0.01, 0.01)
    assert c.attention_bias and c.lm_head_bias and c.layer_norm and c.is_moe
    assert (c.hidden_size, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (4096, 8, 6400, 128)
    assert c.rope_scaling.short_mscale == c.rope_scaling.long_mscale == 1.243163121016122
    out = c.to_hf_dict()
    assert out["model_type"] == "phimoe" and out["architectures"] == ["PhimoeForCausalLM"]
    for key, value in RELEASED.items():
        if key not in ("architectures", "rope_scaling"):
            assert out[key] == value, key
    assert out["rope_scaling"]["short_factor"] == RELEASED["rope_scaling"]["short_factor"]
    assert out["rope_scaling"]["long_mscale"] == 1.243163121016122
    assert Phi3Config.from_hf_dict(out) == c
    # transformers reads what we write
    ref = transformers.PhimoeConfig(**small().to_hf_dict())
    assert (ref.num_local_experts, ref.router_jitter_noise, ref.attention_bias, ref.lm_head_bias) == (4, 0.01, True, True)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        Phi3Config.from_hf_dict({**RELEASED, "num_experts_per_tok": 3})
    with pytest.raises(ConfigError, match="mlp_bias"):
        Phi3Config.from_hf_dict({**RELEASED, "mlp_bias": True})


def test_parameter_counts_from_the_released_shapes():
    c = preset("phi-3.5-moe")
    assert Phi3Config.from_hf_dict(RELEASED).num_parameters() == c.num_parameters()
    from_shapes = sum(math.prod(s) for s in hf.expected_shapes(c).values())
    assert c.num_parameters() == from_shapes == 41_873_153_344  # "42B total" (the card: 41.9B)
    per_expert = 3 * 4096 * 6400
    assert c.num_parameters(active=True) == from_shapes - 32 * 14 * per_expert == 6_640_999_744  # "6.6B active"
    tiny = Phi3ForCausalLM(small())
    assert sum(p.numel() for p in tiny.parameters()) == small().num_parameters()
    assert set(dict(tiny.named_parameters())) == set(hf.expected_shapes(small()))


# ---- routing ---------------------------------------------------------------------------------------------------

def sparsemixer_by_row(logits: torch.Tensor, eps: float) -> tuple[list, list]:
    """The reference's inference routing written out per token, in plain Python floats."""
    weights, experts = [], []
    for row in logits.tolist():
        top = max(row)
        e1 = row.index(top)
        kept = [s for s in row if (top - s) / max(abs(s), top) <= 2 * eps]
        w1 = math.exp(top) / sum(math.exp(s) for s in kept)
        rest = [(-math.inf if j == e1 else s) for j, s in enumerate(row)]
        top2 = max(rest)
        e2 = rest.index(top2)
        kept2 = [s for j, s in enumerate(rest) if j != e1 and (top2 - row[j]) / max(abs(row[j]), top2) <= 2 * eps]
        w2 = math.exp(top2) / sum(math.exp(s) for s in kept2)
        weights.append([w1, w2])
        experts.append([e1, e2])
    return weights, experts


def test_sparsemixer_is_not_softmax_top2_renormalised():
    # a near tie (within 2 * eps relative) shares the first weight; a clear winner gets weight 1.0, and so does
    # the second expert when nothing else is near it: the weights do not sum to 1
    logits = torch.tensor([[3.0, 2.99, 0.0, -1.0], [5.0, 1.0, 0.5, 0.0]])
    w, e = sparsemixer_route(logits, 0.01)
    assert e.tolist() == [[0, 1], [0, 1]]
    assert torch.allclose(w, torch.tensor([[1 / (1 + math.exp(-0.01)), 1.0], [1.0, 1.0]]), atol=1e-6)
    renorm = torch.softmax(logits, -1).topk(2).values
    renorm = renorm / renorm.sum(-1, keepdim=True)
    assert (w - renorm).abs().max() > 0.4
    # against the per-row definition and against transformers' own function, on many random rows with ties
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 16, generator=g) * torch.tensor([0.02, 1.0, 5.0, 0.3]).repeat(100)[:, None]
    w, e = sparsemixer_route(logits, 0.01)
    ref_w, ref_e = sparsemixer_by_row(logits.double(), 0.01)
    assert e.tolist() == ref_e
    assert torch.allclose(w.double(), torch.tensor(ref_w, dtype=torch.float64), atol=1e-6)
    hf_w, hf_e = modeling_phimoe.sparsemixer(logits.clone(), jitter_eps=0.01, training=False)
    assert torch.equal(hf_e, e) and torch.equal(hf_w, w)
    assert (w.sum(-1) - 1).abs().max() > 0.5  # many rows are not normalised


def test_load_balancing_loss_matches_reference():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(24, 4, generator=g) for _ in range(3)]
    expected = modeling_phimoe.load_balancing_loss_func(tuple(logits), 4, 2)
    assert torch.allclose(load_balancing_loss(logits), expected, atol=1e-6)
    mask = torch.tensor([1, 1, 0, 1] * 6)
    expected = modeling_phimoe.load_balancing_loss_func(tuple(logits), 4, 2, mask.view(2, 12))
    assert torch.allclose(load_balancing_loss(logits, row_mask=mask), expected, atol=1e-6)
    # perfectly balanced routing gives top_k (the minimum)
    balanced = [torch.zeros(8, 4)]
    assert abs(load_balancing_loss(balanced).item() - 2.0) < 1e-6


# ---- parity with transformers ----------------------------------------------------------------------------------

def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norms and biases (both libraries initialise them to 1 / 0) and a wider router, so that a wrong
    norm, bias or routing rule shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif "gate" in n or "router" in n:
                p.mul_(20.0)


def use_long_factors_past_the_switch(ref) -> None:
    """Make transformers' PhiMoE rotary use the long factors for long sequences (see the module docstring)."""
    rotary = ref.model.rotary_emb
    compute = rotary.rope_init_fn
    forward = rotary.forward

    def patched(x, position_ids=None):
        rotary.rope_init_fn = functools.partial(compute, seq_len=int(position_ids.max()) + 1)
        try:
            return forward(x, position_ids)
        finally:
            rotary.rope_init_fn = compute

    rotary.forward = patched


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random transformers PhimoeForCausalLM saved with save_pretrained, and pocketlm's load of the folder."""
    folder = tmp_path_factory.mktemp("phimoe")
    torch.manual_seed(0)
    ref = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**small().to_hf_dict())).eval()
    perturb(ref, 0)
    ref.save_pretrained(folder)
    ours = pocketlm.load(folder)
    assert ours.config.is_moe and ours.config.num_local_experts == 4
    return ref, ours


@pytest.mark.parametrize("T", [1, 37, 4096, 4097])
def test_logits_match_reference(pair, T):
    ref, ours = pair
    ids = torch.randint(0, 512, (2 if T < 100 else 1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        got = ours(ids)
        if T > 4096:
            unpatched = ref(ids).logits
            use_long_factors_past_the_switch(ref)
        expected = ref(ids).logits
    assert (got - expected).abs().max().item() <= TOL
    if T > 4096:
        del ref.model.rotary_emb.forward
        assert (got - unpatched).abs().max().item() > 1e-2  # the long factors are really in use


def test_greedy_and_kv_cache_match_reference(pair):
    from pocketlm.engine.generate import generate_ids
    from pocketlm.engine.sampling import SamplingParams
    ref, ours = pair
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = list(generate_ids(ours, ids[0].tolist(), SamplingParams(temperature=0, max_tokens=16)))
    assert got == expected[0, 12:].tolist()
    # KV cache decoding equals the full forward at every step
    seq = expected[:, :20]
    with torch.no_grad():
        full = ours(seq)
        cache = ours.make_cache(1, 64)
        parts = [ours(seq[:, :9], cache)] + [ours(seq[:, t:t + 1], cache) for t in range(9, 20)]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= TOL


def test_forward_batched_rows_equal_single_rows(pair):
    _, ours = pair
    a, b = torch.randint(0, 512, (1, 14)), torch.randint(0, 512, (1, 6))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(14), torch.arange(6)])[None]
    doc = torch.tensor([0] * 14 + [1] * 6)[None]
    with torch.no_grad():
        out = ours.forward_batched(packed, pos, ours.attention_mask(pos, pos, q_doc=doc, k_doc=doc))
        assert (out[0, 14:] - ours(b)[0]).abs().max() <= TOL
        assert (out[0, :14] - ours(a)[0]).abs().max() <= TOL


def test_pocketlm_checkpoint_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    model = Phi3ForCausalLM(small()).eval()
    perturb(model, 3)
    hf.save_checkpoint(model, tmp_path)
    ref = transformers.PhimoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 50))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= TOL
    # and back: the same tensors under the released names
    again = pocketlm.load(tmp_path)
    for n, p in model.state_dict().items():
        assert torch.equal(p, again.state_dict()[n]), n


def test_preset_loads_and_generates():
    model = pocketlm.load("tiny-moe")
    assert model.config.is_moe and model.model.layers[0].block_sparse_moe.gate.weight.shape == (4, 128)
    from pocketlm.engine.generate import generate_ids
    from pocketlm.engine.sampling import SamplingParams
    out = list(generate_ids(model, [1, 100, 200], SamplingParams(temperature=0, max_tokens=5)))
    assert len(out) == 5


def test_quantized_experts_and_only_two_experts_run_per_decode_token():
    from pocketlm.quant.linear import QuantizedLinear
    import copy

    from pocketlm.quant.linear import quantize_model
    model = hf.init_weights(Phi3ForCausalLM(small()), seed=2).eval()
    with torch.no_grad():  # a decisive router: random-init logits sit near SparseMixer's 2*eps ties, where any
        for layer in model.model.layers:  # rounding flips a weight between two values
            layer.block_sparse_moe.gate.weight.mul_(30)
    assert pocketlm.load("tiny-moe", quantize="q8_0").model.layers[0].block_sparse_moe.experts[0].w1.type_name == "Q8_0"
    quant = quantize_model(copy.deepcopy(model), "q8_0", backend="reference")  # exact maths on the Q8_0 weights
    fast = quantize_model(copy.deepcopy(model), "q8_0")  # the CPU kernels (int8 activations, as llama.cpp)
    assert fast.model.layers[1].block_sparse_moe.experts[3].w2.backend == "kernel"
    moe = quant.model.layers[0].block_sparse_moe
    assert isinstance(moe.experts[0].w1, QuantizedLinear) and isinstance(quant.model.layers[0].self_attn.q_proj,
                                                                          QuantizedLinear)
    assert isinstance(moe.gate, torch.nn.Linear) and moe.gate.weight.dtype == torch.float32  # router stays float
    assert quant.model.layers[0].self_attn.q_proj.bias is not None and quant.lm_head.bias is not None
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    # the quantized model computes the float model of its dequantized weights (biases and router as they were)
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quant.named_modules():
            if isinstance(module, QuantizedLinear):
                deq.get_submodule(name).weight.copy_(module.dequantized())
        deq.model.embed_tokens.weight.copy_(quant.model.embed_tokens(torch.arange(512)))
        a, b, c = model(ids), quant(ids), deq(ids)
    assert (b - c).abs().max() <= 1e-4 * c.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    # a decode step runs exactly num_experts_per_tok experts per layer
    calls = []
    quant = fast
    for layer in quant.model.layers:
        for e, expert in enumerate(layer.block_sparse_moe.experts):
            expert.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0])))
    with torch.no_grad():
        cache = quant.make_cache(1, 32)
        quant(ids, cache)
        calls.clear()
        quant(ids[:, :1], cache)
    assert len(calls) == 2 * quant.config.num_hidden_layers and all(rows == 1 for _, rows in calls)
