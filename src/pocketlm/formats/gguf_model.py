"""The `phi3` GGUF architecture (as llama.cpp's converter writes it): metadata -> Phi3Config, tensor names.

Names and metadata keys: ../shared/phi3-spec.md §2.2. The fused `attn_qkv` and `ffn_up` (= gate_up) tensors map
one to one onto the checkpoint names; split `attn_q`/`attn_k`/`attn_v` are concatenated. LongRoPE factors live
in the `rope_factors_short/long.weight` tensors and the magnitude in `phi3.rope.scaling.attn_factor`.
Loading the tensors (float and quantized, phi3 and llama) is `pocketlm.quant.gguf_import.load_gguf`.

`check_layout` runs before any config is built or tensor read: every declared size is bounded
(`config.SIZE_LIMITS`) and checked against the tensors the file really holds (block_count against the blk.N
present, embedding_length and vocabulary against token_embd, head counts dividing, every required tensor present
with the implied shape), so a small file that declares a huge model is one WeightFormatError, never an allocation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from pocketlm.config import SIZE_LIMITS, Phi3Config, RopeScaling
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats.gguf import GGML_TYPES, GGUFFile

UINT = ("uint32", "int32", "uint64", "int64")
FLOAT = ("float32", "float64")
_REQUIRED = object()

# Size keys (after "<arch>.") -> the Phi3Config field whose upper bound (config.SIZE_LIMITS) applies to them
SIZE_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
    "rope.scaling.original_context_length": "original_max_position_embeddings",
    "rope.dimension_count": "hidden_size",
    "attention.key_length": "hidden_size",
    "vocab_size": "vocab_size",
}

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


def size_value(g: GGUFFile, key: str, default: int | object = _REQUIRED) -> int:
    """An integer size hyper-parameter (`phi3.block_count`, ...), checked to lie in [1, its limit]."""
    value = g.metadata_get(key, UINT) if default is _REQUIRED else g.metadata_get(key, UINT, default)
    limit = SIZE_LIMITS[SIZE_KEYS[key.split(".", 1)[1]]]
    if not 1 <= value <= limit:
        raise WeightFormatError(f"{g.path}: {key} = {value} is outside [1, {limit}]")
    return int(value)


def index_spans(indices: set[int]) -> str:
    """Layer indices for a message: {0, 1, 2, 5} -> "0-2, 5" (at most 4 spans; "none" when empty)."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:4])
    return (text + ", ...") if len(spans) > 4 else text or "none"


def expected_tensor_shapes(g: GGUFFile, arch: str, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every tensor a phi3/llama file with these sizes must hold, with its shape (PyTorch order, as
    `TensorInfo.shape`). Where the converters have two layouts (fused `attn_qkv` or split `attn_q/k/v`; fused
    `ffn_up` or `ffn_gate` + `ffn_up`), the one the file uses for that layer is expected."""
    h, ffn, heads, kv = (sizes[k] for k in ("embedding_length", "feed_forward_length", "attention.head_count",
                                             "attention.head_count_kv"))
    hd, vocab = h // heads, sizes["vocab"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    if "output.weight" in g.tensors:
        shapes["output.weight"] = (vocab, h)
    for i in range(sizes["block_count"]):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,),
                       b + "attn_output.weight": (h, heads * hd), b + "ffn_down.weight": (h, ffn)})
        if b + "attn_qkv.weight" in g.tensors:
            shapes[b + "attn_qkv.weight"] = ((heads + 2 * kv) * hd, h)
        else:
            shapes.update({b + "attn_q.weight": (heads * hd, h), b + "attn_k.weight": (kv * hd, h),
                           b + "attn_v.weight": (kv * hd, h)})
        if b + "ffn_gate.weight" in g.tensors or arch != "phi3":
            shapes.update({b + "ffn_gate.weight": (ffn, h), b + "ffn_up.weight": (ffn, h)})
        else:
            shapes[b + "ffn_up.weight"] = (2 * ffn, h)  # fused gate+up (phi3-spec §2.2)
    if arch == "phi3" and ("rope_factors_long.weight" in g.tensors or "rope_factors_short.weight" in g.tensors):
        rot = sizes["rope.dimension_count"]
        shapes["rope_factors_long.weight"] = shapes["rope_factors_short.weight"] = (rot // 2,)
    return shapes


def check_layout(g: GGUFFile, arch: str) -> dict[str, int]:
    """Read the size hyper-parameters of a phi3/llama file and check them against its tensors, before anything
    is built or read: every size in [1, limit], head counts dividing, `token_embd` of shape (vocab,
    embedding_length), tokenizer no larger than the embedding, exactly the layers `block_count` declares, and
    every tensor those sizes require present with the implied shape. A header that declares 10**12 layers or a
    2**40-wide embedding is one WeightFormatError here, naming the key and its value, in microseconds.

    Returns: the sizes by key suffix ("block_count", "embedding_length", ...) plus "vocab" (embedding rows).
    """
    if not g.tensors:
        raise WeightFormatError(f"{g.path}: the file holds no tensors (a vocab-only GGUF?); it cannot be loaded "
                                "as a model")
    p = f"{arch}."
    sizes = {k: size_value(g, p + k) for k in ("block_count", "embedding_length", "feed_forward_length",
                                               "attention.head_count", "context_length")}
    heads, hidden = sizes["attention.head_count"], sizes["embedding_length"]
    sizes["attention.head_count_kv"] = size_value(g, p + "attention.head_count_kv", heads)
    sizes["rope.scaling.original_context_length"] = size_value(g, p + "rope.scaling.original_context_length",
                                                               sizes["context_length"])
    if hidden % heads:
        raise WeightFormatError(f"{g.path}: {p}embedding_length = {hidden} is not divisible by "
                                f"{p}attention.head_count = {heads}")
    kv = sizes["attention.head_count_kv"]
    if heads % kv:
        raise WeightFormatError(f"{g.path}: {p}attention.head_count = {heads} is not a multiple of "
                                f"{p}attention.head_count_kv = {kv}")
    key_len = size_value(g, p + "attention.key_length", hidden // heads)
    if key_len != hidden // heads:
        raise WeightFormatError(f"{g.path}: {p}attention.key_length = {key_len} differs from embedding_length / "
                                f"head_count = {hidden // heads}; not supported")
    sizes["rope.dimension_count"] = rot = size_value(g, p + "rope.dimension_count", hidden // heads)
    if rot > hidden // heads or rot % 2:
        raise WeightFormatError(f"{g.path}: {p}rope.dimension_count = {rot} must be even and at most the head "
                                f"size {hidden // heads}")
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise WeightFormatError(f"{g.path}: tensor 'token_embd.weight' is missing")
    if len(emb.shape) != 2 or emb.shape[1] != hidden:
        raise WeightFormatError(f"{g.path}: {p}embedding_length = {hidden}, but token_embd.weight has shape "
                                f"{emb.shape}; expected (vocab, {hidden})")
    sizes["vocab"] = vocab = emb.shape[0]
    if vocab > SIZE_LIMITS["vocab_size"]:
        raise WeightFormatError(f"{g.path}: token_embd.weight has {vocab} rows, more than the vocabulary limit "
                                f"{SIZE_LIMITS['vocab_size']}")
    declared = size_value(g, p + "vocab_size", vocab)
    if declared != vocab:
        raise WeightFormatError(f"{g.path}: {p}vocab_size = {declared}, but token_embd.weight has {vocab} rows")
    if g.field_types.get("tokenizer.ggml.tokens") is not None:
        n_tokens = len(g.metadata["tokenizer.ggml.tokens"])
        if n_tokens > vocab:
            raise WeightFormatError(f"{g.path}: tokenizer.ggml.tokens has {n_tokens} entries, but token_embd.weight "
                                    f"has only {vocab} rows (ids past the embedding)")
    layers = set()
    for name in g.tensors:
        parts = name.split(".")
        if parts[0] == "blk":
            if len(parts) < 3 or not parts[1].isdigit():
                raise WeightFormatError(f"{g.path}: tensor {name!r} does not name a layer (blk.<N>.<name>)")
            layers.add(int(parts[1]))
    n = sizes["block_count"]
    if layers != set(range(n)):
        raise WeightFormatError(f"{g.path}: {p}block_count = {n}, but the file holds tensors for {len(layers)} "
                                f"layers (indices {index_spans(layers)})")
    problems = []
    for name, shape in expected_tensor_shapes(g, arch, sizes).items():
        info = g.tensors.get(name)
        if info is None:
            problems.append(f"{name} is missing")
        elif tuple(info.shape) != shape:
            problems.append(f"{name} has shape {tuple(info.shape)}, expected {shape}")
    if problems:
        head = ", ".join(problems[:6]) + (f", ... (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        raise WeightFormatError(f"{g.path}: tensors do not match the metadata ({p}block_count {n}, "
                                f"embedding_length {hidden}, feed_forward_length {sizes['feed_forward_length']}, "
                                f"head_count {heads}/{kv}): {head}")
    return sizes


def _config(g: GGUFFile) -> Phi3Config:
    arch = g.architecture
    if arch != "phi3":
        raise WeightFormatError(f"{g.path}: general.architecture is {arch!r}; this loader reads 'phi3' GGUF files")

    def meta(key, kinds, default=None):
        return g.metadata_get(f"phi3.{key}", kinds, default) if default is not None else \
            g.metadata_get(f"phi3.{key}", kinds)

    sizes = check_layout(g, arch)  # before anything is read or built
    hidden, heads, kv_heads = (sizes[k] for k in ("embedding_length", "attention.head_count",
                                                  "attention.head_count_kv"))
    vocab = sizes["vocab"]
    max_pos, original = sizes["context_length"], sizes["rope.scaling.original_context_length"]
    window = int(meta("attention.sliding_window", UINT, 0))
    rope_scaling = None
    if "rope_factors_long.weight" in g.tensors or "rope_factors_short.weight" in g.tensors:
        # both present with rope.dimension_count / 2 entries (check_layout): small reads
        short = g.tensor("rope_factors_short.weight").astype(np.float64).ravel().tolist()
        long = g.tensor("rope_factors_long.weight").astype(np.float64).ravel().tolist()
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
            vocab_size=vocab, hidden_size=hidden, intermediate_size=sizes["feed_forward_length"],
            num_hidden_layers=sizes["block_count"], num_attention_heads=heads,
            num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
            original_max_position_embeddings=original, rope_theta=float(meta("rope.freq_base", FLOAT, 10000.0)),
            rope_scaling=rope_scaling, sliding_window=window or None,
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", FLOAT)),
            tie_word_embeddings="output.weight" not in g.tensors, bos_token_id=int(bos), eos_token_id=int(eos),
            pad_token_id=int(pad) if pad is not None and pad < vocab else None, torch_dtype="float32",
            chat_format=chat_format, name=g.metadata_get("general.name", "string", None))
    except ConfigError as e:
        raise WeightFormatError(f"{g.path}: metadata describes an invalid model: {e}") from None
    rot = sizes["rope.dimension_count"]
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
