"""phi-3.5-MoE GGUF files in llama.cpp's own layout (`general.architecture = "phimoe"`): export and import.

What llama.cpp's converter (`convert_hf_to_gguf.py` `PhiMoeModel`, a `Phi3MiniModel` subclass) writes, and what
its loader reads:
- keys `phimoe.*` as for phi3 (context_length, embedding_length, feed_forward_length (per expert), block_count,
  attention.head_count / head_count_kv, attention.layer_norm_rms_epsilon, rope.dimension_count, rope.freq_base,
  rope.scaling.original_context_length, rope.scaling.attn_factor, attention.sliding_window) plus
  `phimoe.expert_count` and `phimoe.expert_used_count`;
- tensors: separate `attn_q/attn_k/attn_v/attn_output` with `.bias`, `attn_norm` / `ffn_norm` / `output_norm`
  with `.weight` and `.bias`, `output.weight` and `output.bias`, the router `ffn_gate_inp` (F32), and the experts
  stacked per layer: `ffn_gate_exps` = w1 (E, ff, hidden), `ffn_up_exps` = w3 (E, ff, hidden),
  `ffn_down_exps` = w2 (E, hidden, ff); `rope_factors_long/short` F32 tensors.

llama.cpp RUNS this architecture with different maths from the reference (its `llm_build_phi3` graph, checked in
llama.cpp src/models/phi3.cpp): RMSNorm plus bias where the reference has LayerNorm, softmax-top-2 with the two
weights renormalised where the reference has SparseMixer, and one LongRoPE magnitude (`attn_factor`) for both
modes. The file is the same either way; pocketlm computes the reference maths from it. We write `attn_factor` =
the checkpoint's mscale (the released model has one value for both modes; the converter writes
sqrt(1 + ln(s)/ln(orig)) = 1.19 instead of 1.243), and refuse a model whose two mscales differ.
Our own key `pocketlm.router_jitter_noise` keeps SparseMixer's epsilon (default on import: 0.01, the release's).

Quantized export (`scheme`): every 2-D weight and the stacked experts are quantized by the `pocketlm quantize`
rule for the expert's own (ff, hidden) matrix; norms, biases, the router and the rope factors stay F32. Import
reads every tensor as float (quantized tensors are dequantized).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pocketlm.config import Phi3Config, RopeScaling
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats.gguf import FLOAT, GGML_TYPES, UINT, GGUFFile
from pocketlm.quant import codecs
from pocketlm.quant import linear as ql
from pocketlm.quant.gguf_writer import GGUFWriter

ARCH = "phimoe"
# per layer: GGUF name -> checkpoint name (both with the layer index as {i})
LAYER_TENSORS = {
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_norm.bias": "model.layers.{i}.input_layernorm.bias",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.bias": "model.layers.{i}.post_attention_layernorm.bias",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
}
EXPERTS = {"blk.{i}.ffn_gate_exps.weight": "w1", "blk.{i}.ffn_down_exps.weight": "w2",
           "blk.{i}.ffn_up_exps.weight": "w3"}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output_norm.bias": "model.norm.bias", "output.weight": "lm_head.weight",
                  "output.bias": "lm_head.bias"}


def _check_llamacpp_layout(c: Phi3Config) -> None:
    if not (c.is_moe and c.attention_bias and c.lm_head_bias and c.layer_norm and not c.tie_word_embeddings):
        raise WeightFormatError("the phimoe GGUF layout needs a phi-3.5-MoE structure (experts, biased attention "
                                "and lm_head, LayerNorm, untied embeddings)")
    rs = c.rope_scaling
    if rs is not None and rs.short_mscale != rs.long_mscale:
        raise WeightFormatError(f"rope_scaling has short_mscale {rs.short_mscale} and long_mscale {rs.long_mscale}: "
                                "llama.cpp's phimoe applies one magnitude (rope.scaling.attn_factor) to both modes")


def _floats(t: torch.Tensor, type_name: str) -> np.ndarray:
    """A tensor's bytes as the GGUF stores them: the float types as the phi3 writer writes them, else quantized."""
    from pocketlm.quant.gguf_export import _float_bytes
    if type_name in ("F32", "F16", "BF16"):
        return _float_bytes(t, type_name)
    return ql.quantize_tensor(t.detach().cpu().reshape(-1, t.shape[-1]).float(), type_name).numpy()


def export_phimoe_gguf(model, path: str | os.PathLike, *, tokenizer=None, scheme: str | None = None,
                       name: str | None = None) -> dict[str, str]:
    """Write a float phi-3.5-MoE `Phi3ForCausalLM` as a llama.cpp `phimoe` GGUF file.

    scheme: a `pocketlm quantize` scheme (`quant.linear.SCHEMES`) for the weight matrices and experts;
    None keeps the model's float dtype. Returns: GGUF tensor name -> ggml type written."""
    from pocketlm.quant.gguf_export import FILE_TYPES, write_tokenizer
    from pocketlm.tokenizer import Tokenizer

    c = model.config
    _check_llamacpp_layout(c)
    if any(isinstance(m, (ql.QuantizedLinear, ql.QuantizedEmbedding)) for m in model.modules()):
        raise WeightFormatError("export_phimoe_gguf writes float models; quantize with `scheme` instead")
    params = dict(model.named_parameters())
    float_scheme = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[params[
        "model.embed_tokens.weight"].dtype]
    scheme = scheme or float_scheme

    def weight_type(ckpt: str, shape: tuple[int, ...]) -> str:
        return ql.tensor_type(scheme, ckpt, shape, num_layers=c.num_hidden_layers, tied=c.tie_word_embeddings)

    plan: dict[str, tuple[str, tuple, object]] = {}  # gguf name -> (type, shape, producer)

    def add(gname: str, ckpt: str) -> None:
        p = params[ckpt]
        shape = tuple(p.shape)
        t = "F32" if p.ndim == 1 or "block_sparse_moe.gate" in ckpt else weight_type(ckpt, shape)
        plan[gname] = (t, shape, lambda p=p, t=t: _floats(p, t))

    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(c.num_hidden_layers):
        for gname, ckpt in LAYER_TENSORS.items():
            add(gname.format(i=i), ckpt.format(i=i))
        for gname, w in EXPERTS.items():
            mats = [params[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"]
                    for e in range(c.num_local_experts)]
            t = weight_type(f"model.layers.{i}.block_sparse_moe.experts.0.{w}.weight", tuple(mats[0].shape))
            shape = (len(mats), *mats[0].shape)  # (E, rows, cols)
            plan[gname.format(i=i)] = (t, shape, lambda mats=mats, t=t: _floats(torch.stack(mats), t))
    for gname in ("output_norm.weight", "output_norm.bias", "output.weight", "output.bias"):
        add(gname, GLOBAL_TENSORS[gname])

    tokenizer = tokenizer if tokenizer is not None else Tokenizer.default()
    major = ql.SCHEMES[scheme]
    w = GGUFWriter(path)
    w.add_string("general.architecture", ARCH)
    if name or c.name:
        w.add_string("general.name", name or c.name)
    for key, value in (("context_length", c.max_position_embeddings),
                       ("rope.scaling.original_context_length", c.original_max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                       ("block_count", c.num_hidden_layers), ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads), ("rope.dimension_count", c.rotary_dim),
                       ("attention.sliding_window", c.sliding_window or 0), ("expert_count", c.num_local_experts),
                       ("expert_used_count", c.num_experts_per_tok)):
        w.add_uint32(f"{ARCH}.{key}", value)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(f"{ARCH}.rope.freq_base", c.rope_theta)
    if c.rope_scaling is not None:
        m = c.rope_scaling.short_mscale
        w.add_float32(f"{ARCH}.rope.scaling.attn_factor", c.rope_attention_factor if m is None else m)
    w.add_uint32("general.file_type", FILE_TYPES.get("Q4_K_M" if scheme == "q4_k_m" else major, 1))
    w.add_uint32("general.quantization_version", 2)
    w.add_float32("pocketlm.router_jitter_noise", c.router_jitter_noise)
    if scheme != float_scheme:
        w.add_string("pocketlm.scheme", scheme)
    write_tokenizer(w, tokenizer, c)
    if c.rope_scaling is not None:
        for gname, factors in (("rope_factors_long.weight", c.rope_scaling.long_factor),
                               ("rope_factors_short.weight", c.rope_scaling.short_factor)):
            arr = np.asarray(factors, dtype=np.float32)
            plan[gname] = ("F32", arr.shape, lambda a=arr: a)
    for gname, (t, shape, _) in plan.items():
        w.add_tensor_info(gname, shape, t)
    w.write(lambda g: plan[g][2]())
    return {g: t for g, (t, _, _) in plan.items()}


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that float32 rounds to it (0.01, not 0.0099999998)."""
    return float(str(np.float32(x)))


def _meta(g: GGUFFile, key: str, kind, default=None):
    return g.metadata_get(key, kind, default) if default is not None else g.metadata_get(key, kind)


def phimoe_config(g: GGUFFile) -> Phi3Config:
    """The config a `phimoe` GGUF file describes (sizes checked against the tensors before anything is read)."""
    u, f = UINT, FLOAT
    sizes = {k: int(_meta(g, f"{ARCH}.{k}", u)) for k in (
        "context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
        "attention.head_count_kv", "expert_count", "expert_used_count", "rope.dimension_count")}
    original = int(_meta(g, f"{ARCH}.rope.scaling.original_context_length", u, sizes["context_length"]))
    emb = g.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2 or emb.shape[1] != sizes["embedding_length"]:
        raise WeightFormatError(f"{g.path}: token_embd.weight is missing or does not have "
                                f"{sizes['embedding_length']} columns")
    rope_scaling = None
    if "rope_factors_long.weight" in g.tensors and "rope_factors_short.weight" in g.tensors:
        attn = g.metadata_get(f"{ARCH}.rope.scaling.attn_factor", f, None)
        m = _f32(attn) if attn is not None else None
        rope_scaling = RopeScaling(
            short_factor=tuple(g.tensor("rope_factors_short.weight").astype(np.float64).ravel().tolist()),
            long_factor=tuple(g.tensor("rope_factors_long.weight").astype(np.float64).ravel().tolist()),
            short_mscale=m, long_mscale=m)
    chat_format = "phi3.5"
    template = g.metadata_get("tokenizer.chat_template", "string", None)
    if template is not None:
        from pocketlm.chat import format_for_template
        chat_format = format_for_template(template) or chat_format
    pad = g.metadata_get("tokenizer.ggml.padding_token_id", u, None)
    try:
        return Phi3Config(
            vocab_size=int(emb.shape[0]), hidden_size=sizes["embedding_length"],
            intermediate_size=sizes["feed_forward_length"], num_hidden_layers=sizes["block_count"],
            num_attention_heads=sizes["attention.head_count"], num_key_value_heads=sizes["attention.head_count_kv"],
            max_position_embeddings=sizes["context_length"], original_max_position_embeddings=original,
            rope_theta=float(_meta(g, f"{ARCH}.rope.freq_base", f, 10000.0)), rope_scaling=rope_scaling,
            sliding_window=int(_meta(g, f"{ARCH}.attention.sliding_window", u, 0)) or None,
            rms_norm_eps=float(_meta(g, f"{ARCH}.attention.layer_norm_rms_epsilon", f)),
            bos_token_id=int(_meta(g, "tokenizer.ggml.bos_token_id", u, 1)),
            eos_token_id=int(_meta(g, "tokenizer.ggml.eos_token_id", u, 32000)),
            pad_token_id=int(pad) if pad is not None and pad < emb.shape[0] else None,
            num_local_experts=sizes["expert_count"], num_experts_per_tok=sizes["expert_used_count"],
            router_jitter_noise=_f32(_meta(g, "pocketlm.router_jitter_noise", f, 0.01)),
            attention_bias=True, lm_head_bias=True, layer_norm=True, torch_dtype="float32",
            chat_format=chat_format, name=g.metadata_get("general.name", "string", None))
    except ConfigError as e:
        raise WeightFormatError(f"{g.path}: metadata describes an invalid model: {e}") from None


def _read(g: GGUFFile, gname: str, shape: tuple[int, ...]) -> torch.Tensor:
    info = g.tensors.get(gname)
    if info is None:
        raise WeightFormatError(f"{g.path}: tensor {gname!r} is missing")
    if tuple(info.shape) != shape:
        raise WeightFormatError(f"{g.path}: tensor {gname!r} has shape {tuple(info.shape)}, expected {shape}")
    t = GGML_TYPES[info.ggml_type].name
    if t in ("F32", "F16", "BF16"):
        return torch.from_numpy(np.array(g.tensor(gname), dtype=np.float32))
    if t not in codecs.BLOCK:
        raise WeightFormatError(f"{g.path}: tensor {gname!r} is {t}; pocketlm reads F32/F16/BF16 and "
                                f"{sorted(codecs.BLOCK)}")
    raw = np.array(g.tensor_bytes(gname)).reshape(int(np.prod(shape[:-1])), -1)
    flat = codecs.dequantize(raw, t, (int(np.prod(shape[:-1])), shape[-1]))
    return torch.from_numpy(np.asarray(flat, dtype=np.float32)).reshape(shape)


def load_phimoe_gguf(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                     device: str | torch.device = "cpu"):
    """A float `Phi3ForCausalLM` (the reference maths) from a llama.cpp `phimoe` GGUF file."""
    from pocketlm.formats.hf import empty_model, expected_shapes, resolve_dtype
    path = Path(path)
    with GGUFFile(path) as g:
        if g.architecture != ARCH:
            raise WeightFormatError(f"{path}: general.architecture is {g.architecture!r}, not {ARCH!r}")
        config = phimoe_config(g)
        expected = expected_shapes(config)
        model = empty_model(config, resolve_dtype(dtype if dtype is not None else "float32", config), device)
        params = dict(model.named_parameters())
        names = {**GLOBAL_TENSORS}
        for i in range(config.num_hidden_layers):
            names.update({gn.format(i=i): ck.format(i=i) for gn, ck in LAYER_TENSORS.items()})
        unknown = set(g.tensors) - set(names) - {"rope_factors_long.weight", "rope_factors_short.weight"} - {
            gn.format(i=i) for gn in EXPERTS for i in range(config.num_hidden_layers)}
        if unknown:
            raise WeightFormatError(f"{path}: unexpected tensors {sorted(unknown)[:6]}")
        with torch.no_grad():
            for gname, ckpt in names.items():
                params[ckpt].copy_(_read(g, gname, expected[ckpt]))
            for i in range(config.num_hidden_layers):
                for gname, w in EXPERTS.items():
                    first = expected[f"model.layers.{i}.block_sparse_moe.experts.0.{w}.weight"]
                    stacked = _read(g, gname.format(i=i), (config.num_local_experts, *first))
                    for e in range(config.num_local_experts):
                        params[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"].copy_(stacked[e])
    return model.eval()
