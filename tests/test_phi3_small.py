"""Phi-3-small (model_type "phi3small"): config, block-sparse layout, model parity, checkpoint layout, quantize.

The reference maths has no CPU implementation to run, so `reference_logits` below re-states the released
`modeling_phi3_small.py` step by step (head-major `_split_heads`, rotary, `expand_kv_to_q_size`, an explicit
softmax over a dense mask built as the block-sparse layout is built: a block mask blown up with `torch.kron` and
and-ed with the causal mask, GEGELU, muP scales, dummy-token fill) in float64, independently of model_small.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pocketlm.config import Phi3Config, preset
from pocketlm.config_small import Phi3SmallConfig
from pocketlm.errors import ConfigError, GenerationError, WeightFormatError
from pocketlm.formats import hf
from pocketlm.model_small import (Phi3SmallForCausalLM, block_layout, blocksparse_attention_blocked,
                                  blocksparse_attention_masked, blocksparse_token_mask, checkpoint_shapes, gegelu)

# microsoft/Phi-3-small-8k-instruct config.json (as released)
RELEASED_8K = {
    "_name_or_path": "Phi-3-small-8k-instruct",
    "architectures": ["Phi3SmallForCausalLM"],
    "attention_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
        "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
        "AutoModelForSequenceClassification": "modeling_phi3_small.Phi3SmallForSequenceClassification",
        "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer",
    },
    "blocksparse_block_size": 64,
    "blocksparse_homo_head_pattern": False,
    "blocksparse_num_local_blocks": 16,
    "blocksparse_triton_kernel_block_size": 64,
    "blocksparse_vert_stride": 8,
    "bos_token_id": 100257,
    "dense_attention_every_n_layers": 2,
    "embedding_dropout_prob": 0.1,
    "eos_token_id": 100257,
    "ff_dim_multiplier": None,
    "ff_intermediate_size": 14336,
    "ffn_dropout_prob": 0.1,
    "gegelu_limit": 20.0,
    "gegelu_pad_to_256": True,
    "hidden_act": "gegelu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "max_position_embeddings": 8192,
    "model_type": "phi3small",
    "mup_attn_multiplier": 1.0,
    "mup_embedding_multiplier": 10.0,
    "mup_use_scaling": True,
    "mup_width_multiplier": 8.0,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_sequence_to_multiple_of_64": True,
    "reorder_and_upcast_attn": False,
    "rope_embedding_base": 1000000,
    "rope_position_scale": 1.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1",
    "use_cache": True,
    "attention_bias": False,
    "vocab_size": 100352,
}
WRITER_DROPS = {"auto_map", "transformers_version"}  # remote-code file names and the writer's version


# ---- config --------------------------------------------------------------------------------------------------

def test_released_config_reads_as_the_preset_and_writes_back():
    c = Phi3Config.from_hf_dict(RELEASED_8K)
    assert isinstance(c, Phi3SmallConfig) and c.model_type == "phi3small"
    assert c.replace(name=None) == preset("phi-3-small-8k").replace(name=None)
    assert (c.intermediate_size, c.rope_theta, c.rms_norm_eps, c.head_dim) == (14336, 1e6, 1e-5, 128)
    assert c.tie_word_embeddings and c.attention_scale == 1 / 128
    out = c.to_hf_dict()
    for key, value in RELEASED_8K.items():
        if key not in WRITER_DROPS:
            assert out[key] == value, key
    assert set(out) - set(RELEASED_8K) == set()
    assert Phi3Config.from_hf_dict(json.loads(json.dumps(out))) == c


def test_128k_style_config_round_trip():
    # the 128k release adds LongRoPE ("su", switching above 8192, per-mode magnitudes); the factor values here
    # are synthetic (64 per set for head_dim 128)
    d = dict(RELEASED_8K, max_position_embeddings=131072, rope_scaling={
        "type": "su", "original_max_position_embeddings": 8192, "short_mscale": 1.0, "long_mscale": 1.25,
        "short_factor": [1.0 + i / 100 for i in range(64)], "long_factor": [1.0 + i for i in range(64)]})
    c = Phi3Config.from_hf_dict(d)
    assert c.original_max_position_embeddings == 8192 and c.rope_scaling.long_mscale == 1.25
    assert Phi3Config.from_hf_dict(c.to_hf_dict()) == c
    m = Phi3SmallForCausalLM(c.replace(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=64, num_hidden_layers=1, vocab_size=512,
                                       bos_token_id=0, eos_token_id=0))  # head_dim 128
    assert m.rope_mode_for(8192) == "short" and m.rope_mode_for(8193) == "long"
    assert m.rotary_emb.magnitude("long") == 1.25


def test_128k_preset_is_the_8k_shapes_with_longrope_switching_at_8192():
    short, long = preset("phi-3-small-8k"), preset("phi-3-small-128k")
    assert isinstance(long, Phi3SmallConfig) and long.max_position_embeddings == 131072
    assert long.original_max_position_embeddings == 8192 and len(long.rope_scaling.long_factor) == 64
    assert long.num_parameters() == short.num_parameters() == 7_392_272_384
    assert Phi3Config.from_hf_dict(long.to_hf_dict()) == long
    # the default magnitude rule: sqrt(1 + ln(131072 / 8192) / ln(8192))
    assert long.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(8192)))


def test_parameter_count_of_the_released_shapes():
    c = preset("phi-3-small-8k")
    # per layer: qkv (6144 x 4096 + 6144) + dense (4096^2 + 4096) + up (28672 x 4096 + 28672)
    # + down (4096 x 14336 + 4096) + 2 LayerNorms (2 x 2 x 4096) = 218,163,200
    per_layer = (6144 * 4096 + 6144) + (4096 * 4096 + 4096) + (28672 * 4096 + 28672) + (4096 * 14336 + 4096) + 16384
    assert per_layer == 218_163_200
    assert c.num_parameters() == 100352 * 4096 + 32 * per_layer + 2 * 4096 == 7_392_272_384
    assert c.num_parameters() == sum(math.prod(s) for s in checkpoint_shapes(c).values())
    tiny = preset("tiny-small")
    model = Phi3SmallForCausalLM(tiny)
    assert sum(p.numel() for p in model.parameters()) == tiny.num_parameters()
    assert {n for n, _ in model.named_parameters()} == set(checkpoint_shapes(tiny))


def test_config_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="hidden_act 'silu'"):
        Phi3Config.from_hf_dict(dict(RELEASED_8K, hidden_act="silu"))
    with pytest.raises(ConfigError, match="blocksparse_triton_kernel_block_size 32"):
        Phi3Config.from_hf_dict(dict(RELEASED_8K, blocksparse_triton_kernel_block_size=32))
    with pytest.raises(ConfigError, match="both ff_dim_multiplier 4"):
        Phi3Config.from_hf_dict(dict(RELEASED_8K, ff_dim_multiplier=4))
    # no ff_intermediate_size: the reference's rule, 4 * (4096 // 3) * 2 = 10920 padded to 11008
    c = Phi3Config.from_hf_dict({k: v for k, v in RELEASED_8K.items() if k != "ff_intermediate_size"}
                                | {"ff_dim_multiplier": 4})
    assert c.intermediate_size == 11008


def test_info_reports_the_exact_count(capsys):
    from pocketlm.cli import main
    assert main(["info", "phi-3-small-8k", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 7_392_272_384 and info["architecture"] == "Phi3SmallForCausalLM"
    assert "16 block-sparse layers" in info["attention"]


# ---- the block-sparse layout ---------------------------------------------------------------------------------

def small_config(**kw) -> Phi3SmallConfig:
    base = dict(vocab_size=4096, bos_token_id=0, eos_token_id=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, blocksparse_block_size=8,
                blocksparse_triton_kernel_block_size=8, blocksparse_num_local_blocks=2, blocksparse_vert_stride=4,
                torch_dtype="float32")
    base.update(kw)
    return Phi3SmallConfig(**base)


def test_layout_hand_checked():
    # 2 heads, stride 4 -> head step max(1, int(4 / 2)) = 2: head 0 stripes at blocks 3, 7, ..., head 1 at 1, 5, 9
    c = small_config(num_attention_heads=2, num_key_value_heads=1, hidden_size=32, blocksparse_vert_stride=4,
                     blocksparse_num_local_blocks=2)
    layout = block_layout(c, 12)
    assert torch.nonzero(layout[0, 9]).flatten().tolist() == [3, 7, 8, 9]
    assert torch.nonzero(layout[1, 9]).flatten().tolist() == [1, 5, 8, 9]
    homo = block_layout(c.replace(blocksparse_homo_head_pattern=True), 12)
    assert torch.nonzero(homo[1, 9]).flatten().tolist() == [3, 7, 8, 9]
    # the released pattern: 32 heads, stride 8 -> step 1, so head h has stripes at blocks 7 - h (mod 8)
    r = preset("phi-3-small-8k")
    big = block_layout(r, 40)
    for h in (0, 5, 31):
        stripes = [k for k in range(40 - 16) if big[h, 39, k]]
        assert stripes == [k for k in range(24) if (k + h + 1) % 8 == 0]
        assert big[h, 39, 24:].all()  # 16 local blocks


def vllm_dense_mask(n_heads, q_len, max_seqlen, block, local, vert, homo) -> torch.Tensor:
    """vLLM's get_sparse_attn_mask(..., return_dense=True) construction (blocksparse_attention/utils.py)."""
    num_blocks = -(-max_seqlen // block)
    q_pos = torch.arange(num_blocks)[None, :, None]
    k_pos = torch.arange(num_blocks)[None, None]
    step = 0 if homo else max(1, int(vert / n_heads))
    strided = torch.vstack([(torch.arange(num_blocks) + h * step + 1) % vert == 0 for h in range(n_heads)])
    block_mask = ((q_pos >= k_pos) & ((q_pos - k_pos < local) | strided.unsqueeze(1))).to(torch.float32)
    dense = torch.kron(block_mask, block_mask.new_ones((block, block)))
    causal = torch.tril(torch.ones(max_seqlen, max_seqlen))[-q_len:]
    return (dense[..., -q_len:, :max_seqlen] * causal[None]).bool()


@pytest.mark.parametrize("heads,vert,local,homo", [(4, 4, 2, False), (4, 8, 3, False), (8, 4, 1, False),
                                                    (4, 8, 2, True), (32, 8, 16, False)])
def test_token_mask_matches_vllm(heads, vert, local, homo):
    c = small_config(num_attention_heads=heads, num_key_value_heads=heads, hidden_size=8 * heads,
                     blocksparse_vert_stride=vert, blocksparse_num_local_blocks=local,
                     blocksparse_homo_head_pattern=homo, blocksparse_block_size=4, blocksparse_triton_kernel_block_size=4)
    # vLLM builds the mask over max_seqlen = max_position_embeddings (a multiple of the block size) and gives the
    # rows of the last q_len positions; q_len 37 is not a multiple of the block
    L, q_len = 160, 37
    ours = blocksparse_token_mask(c, torch.arange(L - q_len, L)[None], torch.arange(L)[None])[0]
    assert torch.equal(ours, vllm_dense_mask(heads, q_len, L, 4, local, vert, homo))


def test_gegelu_clamps_as_the_reference():
    x = torch.tensor([[30.0, 25.0, -3.0, -25.0, float("inf"), float("-inf"), 1.0, 0.5]])
    gate, lin = torch.tensor([20.0, -3.0, float("inf"), 1.0]), torch.tensor([20.0, -20.0, float("-inf"), 0.5])
    expected = gate * torch.sigmoid(1.702 * gate) * (lin + 1)
    assert torch.equal(gegelu(x, 20.0)[0], expected)
    assert not torch.equal(gegelu(x, None), gegelu(x, 20.0))


# ---- the independent reference ----------------------------------------------------------------------------------

def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, biases and LayerNorms included (so a dropped bias or norm term shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if "layernorm" not in name else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("layernorm.weight") else 0.0))
    return model


def reference_logits(sd: dict, c: Phi3SmallConfig, ids: torch.Tensor) -> torch.Tensor:
    """modeling_phi3_small.py re-stated in float64 (no cache): logits (B, T, V)."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = ids.shape
    H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    x = sd["model.embed_tokens.weight"][ids] * c.mup_embedding_multiplier
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64) / c.rope_position_scale, inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(t):
        t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    nb = -(-T // c.blocksparse_block_size)
    step = 0 if c.blocksparse_homo_head_pattern else max(1, int(c.blocksparse_vert_stride / H))
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    sparse_masks = []
    for h in range(H):
        blocks = (qb >= kb) & ((qb - kb < c.blocksparse_num_local_blocks)
                               | ((kb + h * step + 1) % c.blocksparse_vert_stride == 0))
        dense = torch.kron(blocks.double(), torch.ones(c.blocksparse_block_size, c.blocksparse_block_size))
        sparse_masks.append(dense[:T, :T] * torch.tril(torch.ones(T, T, dtype=torch.float64)))
    sparse = torch.stack(sparse_masks).bool()  # (H, T, T)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scale = c.mup_attn_multiplier / hd if c.mup_use_scaling else 1 / math.sqrt(hd)
    eps = c.rms_norm_eps
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        r = x
        x = F.layer_norm(x, (c.hidden_size,), sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"], eps)
        mixed = x @ sd[p + "self_attn.query_key_value.weight"].T + sd[p + "self_attn.query_key_value.bias"]
        mixed = mixed.view(B, T, -1, H // KV + 2, hd)  # (bs, sq, group, q_per_kv + 2, hn)
        q = mixed[:, :, :, :-2].reshape(B, T, H, hd).transpose(1, 2)
        k = mixed[:, :, :, -2].transpose(1, 2)
        v = mixed[:, :, :, -1].transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # expand_kv_to_q_size
        dense_layer = c.dense_attention_every_n_layers and (i + 1) % c.dense_attention_every_n_layers == 0
        mask = causal if dense_layer else sparse
        s = (q @ k.transpose(-1, -2)) * scale
        a = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
        a = a.transpose(1, 2).reshape(B, T, H * hd)
        x = r + a @ sd[p + "self_attn.dense.weight"].T + sd[p + "self_attn.dense.bias"]
        r = x
        x = F.layer_norm(x, (c.hidden_size,), sd[p + "post_attention_layernorm.weight"],
                         sd[p + "post_attention_layernorm.bias"], eps)
        up = x @ sd[p + "mlp.up_proj.weight"].T + sd[p + "mlp.up_proj.bias"]
        g, lin = up[..., ::2], up[..., 1::2]
        lim = c.gegelu_limit
        g = torch.where(torch.isinf(g), g, g.clamp(max=lim))
        lin = torch.where(torch.isinf(lin), lin, lin.clamp(min=-lim, max=lim))
        x = r + ((g * torch.sigmoid(1.702 * g)) * (lin + 1)) @ sd[p + "mlp.down_proj.weight"].T \
            + sd[p + "mlp.down_proj.bias"]
    x = F.layer_norm(x, (c.hidden_size,), sd["model.final_layernorm.weight"], sd["model.final_layernorm.bias"], eps)
    logits = (x @ sd["model.embed_tokens.weight"].T) / c.mup_width_multiplier
    return logits


DUMMY = [100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100277), *range(100277, 100352)]


@pytest.mark.parametrize("kw", [dict(), dict(blocksparse_homo_head_pattern=True, blocksparse_vert_stride=8),
                                dict(num_attention_heads=8, num_key_value_heads=2, blocksparse_vert_stride=4,
                                     blocksparse_num_local_blocks=3, mup_use_scaling=False,
                                     dense_attention_every_n_layers=3, num_hidden_layers=3, gegelu_limit=0.05)])
def test_parity_with_the_reference(kw):
    torch.manual_seed(0)
    c = small_config(**kw)
    model = randomize(Phi3SmallForCausalLM(c)).eval()
    ids = torch.randint(0, 4096, (2, 83))  # 11 blocks of 8, the last one partial
    with torch.no_grad():
        ours = model(ids)
        ref = reference_logits(model.state_dict(), c, ids)
    assert ours.dtype == torch.float32
    assert (ours.double() - ref).abs().max() < 1e-4
    # the sparse layers matter: a plain causal model differs from the reference
    dense = reference_logits(model.state_dict(), c.replace(dense_attention_every_n_layers=1), ids)
    assert (dense - ref).abs().max() > 1e-3


def test_dummy_vocabulary_ids_are_masked():
    c = preset("tiny-small")
    assert list(c.dummy_token_ids()) == DUMMY
    model = randomize(Phi3SmallForCausalLM(c), seed=9).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[100257, 9906, 1917]]))
    assert (logits[..., DUMMY] == torch.finfo(torch.float32).min).all()
    assert (logits[..., :100256] > -1e3).all() and (logits[..., [100257, 100261, 100266]] > -1e3).all()


def test_blocked_kernel_equals_masked_for_chunks_at_any_offset():
    torch.manual_seed(1)
    c = small_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, blocksparse_vert_stride=3)
    q = torch.randn(2, 8, 300, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 300, 8, dtype=torch.float64), torch.randn(2, 2, 300, 8, dtype=torch.float64)
    for start, T in ((0, 300), (13, 287), (299, 1), (40, 260), (200, 100)):
        L = start + T
        blocked = blocksparse_attention_blocked(q[:, :, start:L], k[:, :, :L], v[:, :, :L], c, start)
        masked = blocksparse_attention_masked(q[:, :, start:L], k[:, :, :L], v[:, :, :L], c,
                                              torch.arange(start, L)[None], torch.arange(L)[None])
        assert (blocked - masked).abs().max() < 1e-12, (start, T)
    # training goes through the blocked kernel (model(ids)): its gradients are the masked attention's
    grads = []
    for fn in (lambda a, b, d: blocksparse_attention_blocked(a, b, d, c, 0),
               lambda a, b, d: blocksparse_attention_masked(a, b, d, c, torch.arange(300)[None],
                                                            torch.arange(300)[None])):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-10


def test_cache_decode_and_batched_rows_equal_the_full_forward():
    torch.manual_seed(2)
    c = small_config()
    model = randomize(Phi3SmallForCausalLM(c), seed=3).eval()
    ids = torch.randint(0, 4096, (1, 70))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(1, 80)
        parts = [model(ids[:, :29], cache)] + [model(ids[:, t:t + 1], cache) for t in range(29, 70)]
        assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
        # two rows at their own positions (left padded), as the server batches them
        short = ids[:, 30:]
        rows = torch.cat([ids, torch.cat([torch.zeros(1, 30, dtype=torch.long), short], 1)])
        pos = torch.stack([torch.arange(70), (torch.arange(70) - 30).clamp(min=0)])
        valid = torch.stack([torch.ones(70, dtype=torch.bool), torch.arange(70) >= 30])
        mask = model.attention_mask(pos, pos, k_valid=valid)
        out = model.forward_batched(rows, pos, mask)
        assert (out[0] - full[0]).abs().max() < 1e-5
        assert (out[1, 30:] - model(short)[0]).abs().max() < 1e-5
        with pytest.raises(GenerationError, match="own attention_mask"):
            model.forward_batched(rows, pos, mask.dense)


def test_training_gradients_agree_between_the_two_paths():
    # pretraining calls model(ids) (block-skipping kernel), SFT calls forward_batched (masked): same gradients
    torch.manual_seed(7)
    c = small_config()
    model = randomize(Phi3SmallForCausalLM(c), seed=8)
    ids = torch.randint(0, 4096, (2, 60))
    grads = []
    for batched in (False, True):
        model.zero_grad()
        if batched:
            pos = torch.arange(60)[None].expand(2, -1)
            logits = model.forward_batched(ids, pos, model.attention_mask(pos, pos))
        else:
            logits = model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.isfinite(g).all() and (g - grads[1][name]).abs().max() < 1e-5, name


def test_greedy_generation_matches_argmax_of_full_forward():
    from pocketlm.engine.generate import generate_ids
    from pocketlm.engine.sampling import SamplingParams
    torch.manual_seed(4)
    c = small_config(max_position_embeddings=128)
    model = randomize(Phi3SmallForCausalLM(c), seed=5).eval()
    prompt = torch.randint(0, 4096, (40,)).tolist()
    out = list(generate_ids(model, prompt, SamplingParams(max_tokens=12, temperature=0.0), prefill_chunk_size=16))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[40:]


# ---- checkpoint layout, quantize, GGUF refusal --------------------------------------------------------------------

def test_checkpoint_round_trip_quantize_and_gguf_refusal(tmp_path):
    from safetensors import safe_open

    from pocketlm.quant.gguf_export import export_gguf
    from pocketlm.quant.linear import QuantizedLinear, quantize_model
    from pocketlm.quant.qcheckpoint import load_quantized, save_quantized
    from pocketlm.tokenizer_small import Phi3SmallTokenizer
    c = small_config(hidden_size=64, intermediate_size=64)
    model = randomize(Phi3SmallForCausalLM(c), seed=6).eval()
    ids = torch.randint(0, 4096, (1, 50))
    with torch.no_grad():
        want = model(ids)
    folder = hf.save_checkpoint(model, tmp_path / "ckpt", tokenizer=Phi3SmallTokenizer.default())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "phi3small" and config["ff_intermediate_size"] == 64
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert names == set(checkpoint_shapes(c)) and "lm_head.weight" not in names  # tied, as released
    assert "model.layers.0.self_attn.query_key_value.bias" in names and "model.final_layernorm.bias" in names
    assert (folder / "cl100k_base.tiktoken").exists()
    loaded = hf.load_checkpoint(folder)
    assert isinstance(loaded, Phi3SmallForCausalLM) and loaded.config == c
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)
        # quantized while reading (q8_0): biases and LayerNorms stay float, close to the float model
        q = hf.load_checkpoint(folder, quantize="q8_0")
        assert isinstance(q.model.layers[0].self_attn.query_key_value, QuantizedLinear)
        assert torch.equal(q.model.layers[0].self_attn.query_key_value.bias,
                           model.model.layers[0].self_attn.query_key_value.bias)
        got = q(ids)
        assert (got - want).abs().max() < 0.05 and (got - want).abs().max() > 0
        # pocketlm's quantized safetensors: save and load give the same logits as the in-memory quantized model
        m2 = quantize_model(hf.load_checkpoint(folder), "q8_0", backend="reference")
        out = save_quantized(m2, tmp_path / "q", scheme="q8_0")
        back = load_quantized(out, backend="reference")
        assert torch.equal(back(ids), m2(ids))
        assert (back(ids) - want).abs().max() < 0.05
    with pytest.raises(WeightFormatError, match="llama.cpp has no architecture"):
        export_gguf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
