"""Load GGUF files of the `phi3` and `llama` architectures, quantized or not, into `Phi3ForCausalLM`.

Phi-3's block is Llama-2's, so one model class serves both. What differs in the file:
- `phi3` (llama.cpp `Phi3MiniModel`, phi3-spec §2.2): fused `attn_qkv` and `ffn_up` (= gate_up); metadata and
  names are read with `pocketlm.formats.gguf_model` (`_config`, `_checkpoint_name`), not copied.
- `llama` (llama.cpp `LlamaModel`): split `attn_q/k/v` and `ffn_gate/ffn_up`, concatenated here into
  `qkv_proj` ([Q; K; V] rows) and `gate_up_proj` ([gate; up]); GQA from `head_count_kv`; tied embeddings when
  `output.weight` is absent. The converter PERMUTES the rows of Q and K (`LlamaModel.permute`: per head,
  rows (2, hd/2) -> (hd/2, 2)) so that llama.cpp's interleaved ("NORM") rotary matches the checkpoint's
  rotate-half; we apply the inverse permutation so our NeoX rotate-half is right. Rows of a quantized tensor
  are whole blocks, so the permutation and the concatenations move bytes and never requantize.

Quantized tensors stay quantized (`quant.linear.QuantizedLinear` / `QuantizedEmbedding`, the bytes of the file)
for the types with a torch path and kernels (`quant.linear.TORCH_DEQUANT`: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL
and the K-quants Q4_K, Q5_K, Q6_K); fused groups that mix types are dequantized to float at load. `dequantize=True` makes every weight float.
The model is built on the meta device and filled tensor by tensor, so a quantized file never needs the float
model's memory.

Deviations: llama files with RoPE scaling (`llama.rope.scaling.type` other than none, `rope_freqs.weight`, i.e.
Llama-3.1 style) and a head size other than embedding_length / head_count are refused (WeightFormatError).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pocketlm.config import Phi3Config
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats import gguf_model
from pocketlm.formats.gguf import GGML_TYPES, GGUFFile
from pocketlm.formats.hf import expected_shapes, resolve_dtype
from pocketlm.model import Phi3ForCausalLM, RotaryEmbedding
from pocketlm.quant import codecs, kernels
from pocketlm.quant import linear as ql

UINT = gguf_model.UINT
FLOAT = gguf_model.FLOAT
ARCHITECTURES = ("phi3", "llama")

# llama GGUF names that map one to one ({i} = layer); the split ones are handled in `_layer_tensors`
LLAMA_NAMES = {k: v for k, v in gguf_model.TENSOR_NAMES.items()
               if k not in ("blk.{i}.attn_qkv.weight", "blk.{i}.ffn_up.weight")}


# ----- config ----------------------------------------------------------------------------------------------------

def gguf_config(g: GGUFFile) -> Phi3Config:
    """The model architecture of a phi3 or llama GGUF file."""
    arch = g.architecture
    if arch == "phi3":
        return gguf_model._config(g)
    if arch == "llama":
        return _llama_config(g)
    if arch == "phimoe":
        from pocketlm.quant.gguf_phimoe import phimoe_config
        return phimoe_config(g)
    raise WeightFormatError(f"{g.path}: general.architecture is {arch!r}; pocketlm loads {ARCHITECTURES}")


def _llama_chat_format(g: GGUFFile) -> str:
    """"chatml" when the file's template or vocabulary is ChatML (`<|im_start|>`), else the Phi-3 default."""
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
    sizes = gguf_model.check_layout(g, "llama")  # sizes against the tensors, before anything is read or built
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
            chat_format=_llama_chat_format(g))
    except ConfigError as e:
        raise WeightFormatError(f"{g.path}: metadata describes an invalid model: {e}") from None
    rot = sizes["rope.dimension_count"]  # the head size (attention.key_length) was checked by check_layout
    if rot != config.head_dim:
        raise WeightFormatError(f"{g.path}: llama.rope.dimension_count = {rot} differs from "
                                f"embedding_length / head_count = {config.head_dim}; not supported")
    return config


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
    """Concatenate weights by rows; bytes when every part has the same block type, else float values."""
    first = parts[0]
    cols = {p.shape[1] for p in parts}
    if len(cols) != 1:
        raise WeightFormatError(f"tensors {[p.name for p in parts]} have different column counts {sorted(cols)}")
    out = object.__new__(_Weight)
    out.name = "+".join(p.name for p in parts)
    out.shape = (sum(p.shape[0] for p in parts), first.shape[1])
    if all(p.raw is not None and p.type == first.type for p in parts):
        out.type, out.raw, out.values = first.type, torch.cat([p.raw for p in parts]), None
    else:
        out.type, out.raw, out.values = "F32", None, torch.cat([p.floats() for p in parts])
    return out


def _linear(w: _Weight, dtype: torch.dtype, device, backend: str, dequantize: bool) -> nn.Module:
    if w.raw is not None and not dequantize and w.type in ql.TORCH_DEQUANT:
        return ql.QuantizedLinear(w.raw.to(device), w.type, w.shape[1], dtype=dtype, backend=backend)
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
            gguf_model._checkpoint_name(name, Path(g.path))  # raises on a stray name
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
        config = gguf_config(g)
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
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    assert not leftover, f"not loaded: {leftover[:5]}"
    kernels.release_free_memory()
    return model.eval()


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer of a GGUF file; kept for callers of the old name: `Tokenizer.from_pretrained` is the one
    loader ("llama" and "gpt2" vocabularies; others raise `pocketlm.tokenizer.UnsupportedTokenizerError`)."""
    from pocketlm.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(path)
