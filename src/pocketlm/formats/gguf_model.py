"""GGUF files of the `phi3` and `llama` architectures (and `phimoe`, through `quant.gguf_phimoe`), quantized or
not, read into `Phi3ForCausalLM`: metadata -> Phi3Config, tensor names, tensors. The one home of GGUF import.

Phi-3's block is Llama-2's, so one model class serves both. What differs in the file:
- `phi3` (llama.cpp `Phi3MiniModel`; names and metadata keys: ../shared/phi3-spec.md §2.2): the fused
  `attn_qkv` and `ffn_up` (= gate_up) tensors map one to one onto the checkpoint names; split
  `attn_q`/`attn_k`/`attn_v` are concatenated. LongRoPE factors live in the `rope_factors_short/long.weight`
  tensors and the magnitude in `phi3.rope.scaling.attn_factor`.
- `llama` (llama.cpp `LlamaModel`): split `attn_q/k/v` and `ffn_gate/ffn_up`, concatenated here into
  `qkv_proj` ([Q; K; V] rows) and `gate_up_proj` ([gate; up]); GQA from `head_count_kv`; tied embeddings when
  `output.weight` is absent. The converter PERMUTES the rows of Q and K (`LlamaModel.permute`: per head,
  rows (2, hd/2) -> (hd/2, 2)) so that llama.cpp's interleaved ("NORM") rotary matches the checkpoint's
  rotate-half; we apply the inverse permutation so our NeoX rotate-half is right. Rows of a quantized tensor
  are whole blocks, so the permutation and the concatenations move bytes and never requantize.

`check_layout` runs before any config is built or tensor read: every declared size is bounded
(`config.SIZE_LIMITS`) and checked against the tensors the file really holds (block_count against the blk.N
present, embedding_length and vocabulary against token_embd, head counts dividing, every required tensor present
with the implied shape), so a small file that declares a huge model is one WeightFormatError, never an allocation.

Quantized tensors stay quantized (`quant.linear.QuantizedLinear` / `QuantizedEmbedding`, the bytes of the file)
for the types with a torch path and kernels (`quant.linear.TORCH_DEQUANT`: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL
and the K-quants Q4_K, Q5_K, Q6_K); a fused group whose parts have different types (llama.cpp's Q4_K_M of a
model with rows not a multiple of 256: attn_q/attn_k Q5_0, attn_v Q8_0) keeps every part's bytes as they are, in
a `quant.linear.ConcatQuantizedLinear` (float only when a part is not such a block type).
`dequantize=True` makes every weight float. The model is built on the meta device and filled tensor by tensor,
so a quantized file never needs the float model's memory.

Deviations: llama files with RoPE scaling (`llama.rope.scaling.type` other than none, `rope_freqs.weight`, i.e.
Llama-3.1 style) and a head size other than embedding_length / head_count are refused (WeightFormatError).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pocketlm.config import SIZE_LIMITS, Phi3Config, RopeScaling
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats.gguf import FLOAT, GGML_TYPES, UINT, GGUFFile
from pocketlm.formats.hf import expected_shapes, index_spans, resolve_dtype
from pocketlm.model import Phi3ForCausalLM, RotaryEmbedding
from pocketlm.quant import codecs, kernels
from pocketlm.quant import linear as ql

ARCHITECTURES = ("phi3", "llama")
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

# llama GGUF names that map one to one ({i} = layer); the split ones are handled in `_layer_tensors`
LLAMA_NAMES = {k: v for k, v in TENSOR_NAMES.items()
               if k not in ("blk.{i}.attn_qkv.weight", "blk.{i}.ffn_up.weight")}


# ----- config ----------------------------------------------------------------------------------------------------

def gguf_config(path: str | os.PathLike) -> tuple[Phi3Config, dict]:
    """The architecture of a GGUF file (phi3, llama or phimoe), and facts about the file, without reading tensor
    data."""
    with GGUFFile(path) as g:
        return file_config(g), _file_info(g)


def file_config(g: GGUFFile) -> Phi3Config:
    """The model architecture of an open phi3, llama or phimoe GGUF file."""
    arch = g.architecture
    if arch == "phi3":
        return _phi3_config(g)
    if arch == "llama":
        return _llama_config(g)
    if arch == "phimoe":
        from pocketlm.quant.gguf_phimoe import phimoe_config
        return phimoe_config(g)
    raise WeightFormatError(f"{g.path}: general.architecture is {arch!r}; pocketlm loads {ARCHITECTURES}")


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


def _phi3_config(g: GGUFFile) -> Phi3Config:
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
    chat_format = _file_chat_format(g)
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


def _file_chat_format(g: GGUFFile) -> str:
    """The format whose template the file carries; else "chatml" when its template is ChatML (`<|im_start|>`);
    else the Phi-3 default (phi3 and llama files alike)."""
    template = g.metadata_get("tokenizer.chat_template", "string", "")
    from pocketlm.chat import CHATML, DEFAULT_FORMAT, format_for_template
    known = format_for_template(template)
    if known is not None:
        return known
    return CHATML if "<|im_start|>" in template else DEFAULT_FORMAT


def _llama_config(g: GGUFFile) -> Phi3Config:
    def meta(key, kinds, default=None):
        return g.metadata_get(f"llama.{key}", kinds, default) if default is not None else \
            g.metadata_get(f"llama.{key}", kinds)

    scaling = g.metadata_get("llama.rope.scaling.type", "string", "none")
    if scaling not in ("none", "") or "rope_freqs.weight" in g.tensors:
        raise WeightFormatError(f"{g.path}: llama RoPE scaling {scaling!r} (or rope_freqs) is not supported")
    sizes = check_layout(g, "llama")  # sizes against the tensors, before anything is read or built
    vocab, hidden, heads, ctx = (sizes[k] for k in ("vocab", "embedding_length", "attention.head_count",
                                                    "context_length"))
    bos = g.metadata_get("tokenizer.ggml.bos_token_id", UINT, None)
    eos = g.metadata_get("tokenizer.ggml.eos_token_id", UINT, None)
    pad = g.metadata_get("tokenizer.ggml.padding_token_id", UINT, None)
    try:
        config = Phi3Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=sizes["feed_forward_length"],
            num_hidden_layers=sizes["block_count"], num_attention_heads=heads,
            num_key_value_heads=sizes["attention.head_count_kv"],
            max_position_embeddings=ctx, original_max_position_embeddings=ctx,
            rope_theta=float(meta("rope.freq_base", FLOAT, 10000.0)),
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", FLOAT)),
            tie_word_embeddings="output.weight" not in g.tensors,
            bos_token_id=int(bos) if bos is not None and bos < vocab else None,
            eos_token_id=int(eos) if eos is not None else None,
            pad_token_id=int(pad) if pad is not None and pad < vocab else None,
            torch_dtype="float32", name=g.metadata_get("general.name", "string", None),
            chat_format=_file_chat_format(g))
    except ConfigError as e:
        raise WeightFormatError(f"{g.path}: metadata describes an invalid model: {e}") from None
    rot = sizes["rope.dimension_count"]  # the head size (attention.key_length) was checked by check_layout
    if rot != config.head_dim:
        raise WeightFormatError(f"{g.path}: llama.rope.dimension_count = {rot} differs from "
                                f"embedding_length / head_count = {config.head_dim}; not supported")
    return config


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


# ----- tensors ---------------------------------------------------------------------------------------------------

class _Weight:
    """One GGUF weight matrix: its ggml type, (rows, cols) and raw bytes as a (rows, row_bytes) uint8 tensor,
    or float values for plain types."""

    def __init__(self, g: GGUFFile, name: str):
        info = g.tensors.get(name)
        if info is None:
            raise WeightFormatError(f"{g.path}: tensor {name!r} is missing")
        self.name, self.type = name, GGML_TYPES[info.ggml_type].name
        self.shape = tuple(info.shape)
        want = 1 if name.endswith("norm.weight") else 2
        if len(self.shape) != want:
            raise WeightFormatError(f"{g.path}: tensor {name!r} has shape {self.shape}, expected {want} dimensions")
        if self.type in ("F32", "F16", "BF16"):
            self.raw = None
            self.values = torch.from_numpy(np.array(g.tensor(name), dtype=np.float32))
        elif self.type in codecs.BLOCK:
            rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
            self.raw = torch.from_numpy(np.array(g.tensor_bytes(name)).reshape(rows, -1))
            self.values = None
        else:
            raise WeightFormatError(f"{g.path}: tensor {name!r} is {self.type}; pocketlm reads F32/F16/BF16 and "
                                    f"{sorted(codecs.BLOCK)}")

    def floats(self) -> torch.Tensor:
        if getattr(self, "parts", None):  # block types that differ per part (`_cat_rows`)
            return torch.cat([p.floats() for p in self.parts])
        if self.values is None:
            return torch.from_numpy(codecs.dequantize(self.raw.numpy(), self.type, self.shape))
        return self.values

    def permute_rows(self, n_head: int) -> _Weight:
        """Undo llama.cpp's `LlamaModel.permute` on the rows (per head: (hd/2, 2) -> (2, hd/2))."""
        rows = self.shape[0]
        if rows % (2 * n_head):
            raise WeightFormatError(f"tensor {self.name!r}: {rows} rows do not split into {n_head} rotary heads")
        src = self.raw if self.raw is not None else self.values
        out = src.reshape(n_head, rows // n_head // 2, 2, -1).transpose(1, 2).reshape(src.shape)
        if self.raw is not None:
            self.raw = out.contiguous()
        else:
            self.values = out.contiguous()
        return self


def _cat_rows(parts: list[_Weight]) -> _Weight:
    """Concatenate weights by rows: bytes when every part has the same block type; when the block types differ
    (all with a torch path), the parts themselves (`out.parts`, type "Q5_0+Q5_0+Q8_0", `_linear` builds a
    ConcatQuantizedLinear); else float values."""
    first = parts[0]
    cols = {p.shape[1] for p in parts}
    if len(cols) != 1:
        raise WeightFormatError(f"tensors {[p.name for p in parts]} have different column counts {sorted(cols)}")
    out = object.__new__(_Weight)
    out.name = "+".join(p.name for p in parts)
    out.shape = (sum(p.shape[0] for p in parts), first.shape[1])
    if all(p.raw is not None and p.type == first.type for p in parts):
        out.type, out.raw, out.values = first.type, torch.cat([p.raw for p in parts]), None
    elif all(p.raw is not None and p.type in ql.TORCH_DEQUANT for p in parts):
        out.type, out.raw, out.values, out.parts = "+".join(p.type for p in parts), None, None, parts
    else:
        out.type, out.raw, out.values = "F32", None, torch.cat([p.floats() for p in parts])
    return out


def _linear(w: _Weight, dtype: torch.dtype, device, backend: str, dequantize: bool) -> nn.Module:
    if w.raw is not None and not dequantize and w.type in ql.TORCH_DEQUANT:
        return ql.QuantizedLinear(w.raw.to(device), w.type, w.shape[1], dtype=dtype, backend=backend)
    if getattr(w, "parts", None) and not dequantize:  # block types that differ per part: each keeps its bytes
        return ql.ConcatQuantizedLinear([_linear(p, dtype, device, backend, dequantize) for p in w.parts])
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.copy_(w.floats())
    return lin


def _layer_tensors(g: GGUFFile, arch: str, i: int, config: Phi3Config) -> dict[str, _Weight]:
    """Checkpoint-name suffix -> weight, for layer i."""
    b = f"blk.{i}."
    out = {"input_layernorm": _Weight(g, b + "attn_norm.weight"),
           "post_attention_layernorm": _Weight(g, b + "ffn_norm.weight"),
           "self_attn.o_proj": _Weight(g, b + "attn_output.weight"),
           "mlp.down_proj": _Weight(g, b + "ffn_down.weight")}
    if b + "attn_qkv.weight" in g.tensors:
        out["self_attn.qkv_proj"] = _Weight(g, b + "attn_qkv.weight")
    else:
        q, k, v = (_Weight(g, b + f"attn_{x}.weight") for x in "qkv")
        if arch == "llama":
            q.permute_rows(config.num_attention_heads)
            k.permute_rows(config.num_key_value_heads)
        out["self_attn.qkv_proj"] = _cat_rows([q, k, v])
    if b + "ffn_gate.weight" in g.tensors:
        out["mlp.gate_up_proj"] = _cat_rows([_Weight(g, b + "ffn_gate.weight"), _Weight(g, b + "ffn_up.weight")])
    elif arch == "phi3":
        out["mlp.gate_up_proj"] = _Weight(g, b + "ffn_up.weight")  # fused gate+up (phi3-spec §2.2)
    else:
        raise WeightFormatError(f"{g.path}: layer {i} has no ffn_gate.weight (llama needs gate and up)")
    return out


def _check_names(g: GGUFFile, arch: str, config: Phi3Config) -> None:
    """Every tensor of the file must be one we load (a stray tensor means a different architecture)."""
    for name in g.tensors:
        if name.startswith("rope_factors_") and arch == "phi3":
            continue
        parts = name.split(".")
        if arch == "phi3":
            _checkpoint_name(name, Path(g.path))  # raises on a stray name
            continue
        key = name if parts[0] != "blk" else "blk.{i}." + ".".join(parts[2:])
        split = {"blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight",
                 "blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"}
        if key not in LLAMA_NAMES and key not in split:
            raise WeightFormatError(f"{g.path}: unexpected tensor {name!r} for the llama architecture")
        if parts[0] == "blk" and (not parts[1].isdigit() or int(parts[1]) >= config.num_hidden_layers):
            raise WeightFormatError(f"{g.path}: tensor {name!r} names a layer outside [0, "
                                    f"{config.num_hidden_layers})")


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
              backend: str = "auto", dequantize: bool = False) -> Phi3ForCausalLM:
    """Load a phi3 or llama GGUF file (F32/F16/BF16 and Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/IQ4_NL/Q4_K/Q5_K/Q6_K tensors).

    Args:
        dtype: compute dtype of the float parts and of quantized layers' outputs (default float32).
        backend: QuantizedLinear backend ("auto", "reference", "int4").
        dequantize: load every weight as float (no quantized layers).
    """
    path = Path(path)
    with GGUFFile(path) as g:
        arch = g.architecture
        if arch == "phimoe":  # phi-3.5-MoE in llama.cpp's layout: read as float (quant.gguf_phimoe)
            from pocketlm.quant.gguf_phimoe import load_phimoe_gguf
            return load_phimoe_gguf(path, dtype=dtype, device=device)
        config = file_config(g)
        dtype = resolve_dtype(dtype, config)
        _check_names(g, arch, config)
        expected = expected_shapes(config)
        with torch.device("meta"):
            model = Phi3ForCausalLM(config)
        model.rotary_emb = RotaryEmbedding(config).to(device)
        for i, layer in enumerate(model.model.layers):
            for suffix, w in _layer_tensors(g, arch, i, config).items():
                ckpt = f"model.layers.{i}.{suffix}.weight"
                if w.shape != expected[ckpt]:
                    raise WeightFormatError(f"{path}: {w.name} has shape {w.shape}, expected {expected[ckpt]}")
                if suffix.endswith("layernorm"):
                    layer.get_submodule(suffix).weight = nn.Parameter(w.floats().to(device, dtype))
                else:
                    ql.set_module(layer, suffix, _linear(w, dtype, device, backend, dequantize))
        norm = _Weight(g, "output_norm.weight")
        if norm.shape != expected["model.norm.weight"]:
            raise WeightFormatError(f"{path}: output_norm has shape {norm.shape}")
        model.model.norm.weight = nn.Parameter(norm.floats().to(device, dtype))
        emb = _Weight(g, "token_embd.weight")
        if emb.shape != expected["model.embed_tokens.weight"]:
            raise WeightFormatError(f"{path}: token_embd has shape {emb.shape}")
        quantized_emb = emb.raw is not None and not dequantize and emb.type in ql.TORCH_DEQUANT
        if quantized_emb:
            ql.install_embedding(model, None, emb.type, dtype, backend, tied=config.tie_word_embeddings,
                                 raw=emb.raw.to(device))
        else:
            ql.install_embedding(model, None, "F32", dtype, backend, tied=config.tie_word_embeddings,
                                 raw=emb.floats().to(device))
        if not config.tie_word_embeddings:
            out = _Weight(g, "output.weight")
            if out.shape != expected["lm_head.weight"]:
                raise WeightFormatError(f"{path}: output has shape {out.shape}")
            model.lm_head = _linear(out, dtype, device, backend, dequantize)
        model.declared_repetition_penalty = gguf_repetition_penalty(g)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    assert not leftover, f"not loaded: {leftover[:5]}"
    kernels.release_free_memory()
    return model.eval()


def gguf_repetition_penalty(g: GGUFFile) -> float | None:
    """The repetition penalty a GGUF file declares for generation (llama.cpp's general.sampling.penalty_repeat
    with penalty_last_n -1, the whole context, which is pocketlm's penalty), or None. llama.cpp's default window
    when penalty_last_n is absent is the last 64 tokens, which pocketlm does not implement: such a file's
    penalty is not applied (`sampling.declared_repetition_penalty`)."""
    from pocketlm.engine.sampling import GGUF_PENALTY_LAST_N, GGUF_PENALTY_REPEAT, declared_repetition_penalty
    value = g.metadata.get(GGUF_PENALTY_REPEAT)
    if isinstance(value, float):  # a float32 key: its shortest decimal (1.2, not 1.2000000476837158)
        value = float(np.format_float_positional(np.float32(value)))
    return declared_repetition_penalty(value, g.metadata.get(GGUF_PENALTY_LAST_N, 64))


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer of a GGUF file; kept for callers of the old name: `Tokenizer.from_pretrained` is the one
    loader ("llama" and "gpt2" vocabularies; others raise `pocketlm.tokenizer.UnsupportedTokenizerError`)."""
    from pocketlm.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(path)
