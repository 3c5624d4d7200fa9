"""The `phi3` GGUF architecture (as llama.cpp's converter writes it): metadata -> Phi3Config, tensor names.

Names and metadata keys: ../shared/phi3-spec.md §2.2. The fused `attn_qkv` and `ffn_up` (= gate_up) tensors map
one to one onto the checkpoint names; split `attn_q`/`attn_k`/`attn_v` are concatenated. LongRoPE factors live
in the `rope_factors_short/long.weight` tensors and the magnitude in `phi3.rope.scaling.attn_factor`.
Loading the tensors (float and quantized, phi3 and llama) is `pocketlm.quant.gguf_import.load_gguf`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from pocketlm.config import Phi3Config, RopeScaling
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats.gguf import GGML_TYPES, GGUFFile

UINT = ("uint32", "int32", "uint64", "int64")
FLOAT = ("float32", "float64")

# GGUF tensor name -> checkpoint name ({i} = layer)
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_config(path: str | os.PathLike) -> tuple[Phi3Config, dict]:
    """The architecture of a GGUF file (phi3 or llama), and facts about the file, without reading tensor data."""
    from pocketlm.quant.gguf_import import gguf_config as config_of  # llama files are read by the quant module
    with GGUFFile(path) as g:
        return config_of(g), _file_info(g)


def _file_info(g: GGUFFile) -> dict:
    types = sorted({GGML_TYPES[t.ggml_type].name for t in g.tensors.values()})
    return {"files": [str(g.path)], "file_bytes": os.path.getsize(g.path), "file_dtypes": types}


def _config(g: GGUFFile) -> Phi3Config:
    arch = g.architecture
    if arch != "phi3":
        raise WeightFormatError(f"{g.path}: general.architecture is {arch!r}; this loader reads 'phi3' GGUF files")

    def meta(key, kinds, default=None):
        return g.metadata_get(f"phi3.{key}", kinds, default) if default is not None else \
            g.metadata_get(f"phi3.{key}", kinds)

    hidden = int(meta("embedding_length", UINT))
    heads = int(meta("attention.head_count", UINT))
    kv_heads = int(meta("attention.head_count_kv", UINT, heads))
    if "token_embd.weight" not in g.tensors:
        raise WeightFormatError(f"{g.path}: tensor 'token_embd.weight' is missing")
    vocab = g.tensors["token_embd.weight"].shape[0]
    max_pos = int(meta("context_length", UINT))
    original = int(meta("rope.scaling.original_context_length", UINT, max_pos))
    window = int(meta("attention.sliding_window", UINT, 0))
    rope_scaling = None
    if "rope_factors_long.weight" in g.tensors or "rope_factors_short.weight" in g.tensors:
        try:
            short = g.tensor("rope_factors_short.weight").astype(np.float64).ravel().tolist()
            long = g.tensor("rope_factors_long.weight").astype(np.float64).ravel().tolist()
        except KeyError as e:
            raise WeightFormatError(f"{g.path}: LongRoPE needs both rope factor tensors ({e})") from None
        attn = g.metadata_get("phi3.rope.scaling.attn_factor", FLOAT, None)
        rope_scaling = RopeScaling(short_factor=tuple(short), long_factor=tuple(long),
                                   attention_factor=float(attn) if attn is not None else None)
    bos = g.metadata_get("tokenizer.ggml.bos_token_id", UINT, 1)
    eos = g.metadata_get("tokenizer.ggml.eos_token_id", UINT, 32000)
    pad = g.metadata_get("tokenizer.ggml.padding_token_id", UINT, None)
    chat_format = "phi3-mini-2024-07"
    template = g.metadata_get("tokenizer.chat_template", "string", None)
    if template is not None:
        from pocketlm.chat import format_for_template
        chat_format = format_for_template(template) or chat_format
    try:
        config = Phi3Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(meta("feed_forward_length", UINT)),
            num_hidden_layers=int(meta("block_count", UINT)), num_attention_heads=heads,
            num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
            original_max_position_embeddings=original, rope_theta=float(meta("rope.freq_base", FLOAT, 10000.0)),
            rope_scaling=rope_scaling, sliding_window=window or None,
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", FLOAT)),
            tie_word_embeddings="output.weight" not in g.tensors, bos_token_id=int(bos), eos_token_id=int(eos),
            pad_token_id=int(pad) if pad is not None and pad < vocab else None, torch_dtype="float32",
            chat_format=chat_format, name=g.metadata_get("general.name", "string", None))
    except ConfigError as e:
        raise WeightFormatError(f"{g.path}: metadata describes an invalid model: {e}") from None
    rot = int(meta("rope.dimension_count", UINT, config.head_dim))
    if rot != config.rotary_dim:
        partial = rot / config.head_dim
        if not 0 < partial <= 1:
            raise WeightFormatError(f"{g.path}: phi3.rope.dimension_count {rot} does not fit head_dim "
                                    f"{config.head_dim}")
        config = config.replace(partial_rotary_factor=partial)
    if rope_scaling is not None and math.isclose(config.rope_attention_factor,
                                                 _computed_factor(config), rel_tol=1e-6):
        config = config.replace(rope_scaling=RopeScaling(short_factor=rope_scaling.short_factor,
                                                         long_factor=rope_scaling.long_factor))
    return config


def _computed_factor(config: Phi3Config) -> float:
    s = config.max_position_embeddings / config.original_max_position_embeddings
    return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(config.original_max_position_embeddings))


def _checkpoint_name(gname: str, path: Path) -> str | None:
    if gname in TENSOR_NAMES:
        return TENSOR_NAMES[gname]
    parts = gname.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in ("attn_q", "attn_k", "attn_v"):
            return None  # concatenated into qkv_proj
        key = "blk.{i}." + ".".join(parts[2:])
        if key in TENSOR_NAMES:
            return TENSOR_NAMES[key].format(i=int(parts[1]))
    raise WeightFormatError(f"{path}: unexpected tensor {gname!r} for the phi3 architecture")
