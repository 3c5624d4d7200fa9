"""Quantized checkpoints as safetensors: the official folder layout, with block-quantized weights stored as their
GGUF bytes and the type of every weight in the file's metadata.

    folder/config.json, generation_config.json, tokenizer files    as `formats.hf.save_checkpoint` writes them
    folder/model.safetensors                                       float tensors under their checkpoint names;
                                                                   quantized ones as uint8 (rows, row_bytes)
    __metadata__["pocketlm.quant.types"] = JSON {checkpoint name: ggml type}   (every weight, float ones too)
    __metadata__["pocketlm.quant.scheme"] = the `pocketlm quantize` scheme

Loading validates each tensor against its recorded type and the config's shape; the scheme string is
informational only: types come from the per-tensor table, never from a name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from pocketlm.config import Phi3Config
from pocketlm.errors import WeightFormatError
from pocketlm.formats.hf import expected_shapes
from pocketlm.formats.safetensors_io import CheckpointReader, read_header, write_checkpoint
from pocketlm.model import Phi3ForCausalLM
from pocketlm.quant import codecs, kernels
from pocketlm.quant import linear as ql

TYPES_KEY = "pocketlm.quant.types"
SCHEME_KEY = "pocketlm.quant.scheme"


def is_quantized_checkpoint(folder: str | os.PathLike) -> bool:
    """True when `folder/model.safetensors` carries the quantized-types table (single-file checkpoints only)."""
    f = Path(folder) / "model.safetensors"
    return f.is_file() and TYPES_KEY in read_header(f).metadata


def save_quantized(model: Phi3ForCausalLM, folder: str | os.PathLike, *, scheme: str, tokenizer=None) -> Path:
    """Write a (quantized) model; float layers keep their dtype."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    c.save_json(folder / "config.json")
    from pocketlm.formats.hf import generation_config
    gen = generation_config(c, getattr(model, "declared_repetition_penalty", None), tokenizer)
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    types = {}
    tensors = {}
    modules = dict(model.named_modules())
    for name in expected_shapes(c):
        mod = modules[name.rsplit(".", 1)[0]]
        leaf = name.rsplit(".", 1)[1]  # "weight", or "bias" (float, Phi-3-small's projections and LayerNorms)
        if isinstance(mod, (ql.QuantizedLinear, ql.QuantizedEmbedding)) and leaf == "weight":
            types[name], tensors[name] = mod.type_name, mod.qweight.detach().cpu()
        else:
            w = getattr(mod, leaf).detach().cpu()
            types[name] = {v: k for k, v in ql.FLOAT_TYPES.items()}[w.dtype]
            tensors[name] = w
    write_checkpoint(folder, tensors, max_shard_bytes=2**62,
                     metadata={TYPES_KEY: json.dumps(types, sort_keys=True), SCHEME_KEY: scheme})
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        from pocketlm.chat import TEMPLATES
        tokenizer.save_pretrained(folder, chat_template=TEMPLATES[c.chat_format].replace("\\n", "\n"))
    return folder


def load_quantized(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
                   backend: str = "auto") -> Phi3ForCausalLM:
    folder = Path(folder)
    config = Phi3Config.from_json_file(folder / "config.json")
    path = folder / "model.safetensors"
    raw_types = read_header(path).metadata.get(TYPES_KEY)
    try:
        types = json.loads(raw_types) if raw_types is not None else None
    except json.JSONDecodeError as e:
        raise WeightFormatError(f"{path}: {TYPES_KEY} is not JSON: {e}") from None
    if not isinstance(types, dict):
        raise WeightFormatError(f"{path}: metadata {TYPES_KEY} is missing or not an object")
    expected = expected_shapes(config)
    if set(types) != set(expected):
        raise WeightFormatError(f"{path}: the type table names {sorted(set(types) ^ set(expected))[:6]} "
                                f"differently from the config's tensors")
    from pocketlm.formats.hf import model_class
    with torch.device("meta"):
        model = model_class(config)(config)
    model.rotary_emb = type(model.rotary_emb)(config).to(device)
    with CheckpointReader(path) as reader:
        for name, shape in expected.items():
            t, data = types[name], reader.get(name)
            if t in ql.FLOAT_TYPES:
                if tuple(data.shape) != shape or data.dtype != ql.FLOAT_TYPES[t]:
                    raise WeightFormatError(f"{path}: {name} is {data.dtype} {tuple(data.shape)}, recorded as {t} "
                                            f"{shape}")
            elif t in codecs.BLOCK:
                block, size = codecs.BLOCK[t]
                want = (shape[0], shape[1] // block * size) if shape[1] % block == 0 else None
                if data.dtype != torch.uint8 or tuple(data.shape) != want:
                    raise WeightFormatError(f"{path}: {name} bytes {data.dtype} {tuple(data.shape)} do not hold "
                                            f"{t} {shape}")
            else:
                raise WeightFormatError(f"{path}: {name} has unknown type {t!r}")
            _install(model, name, t, data.to(device), dtype, backend)
    kernels.release_free_memory()
    from pocketlm.formats.hf import declared_repetition_penalty_of
    model.declared_repetition_penalty = declared_repetition_penalty_of(folder)
    return model.eval()


def _install(model, name: str, t: str, data: torch.Tensor, dtype, backend: str) -> None:
    module_name = name.rsplit(".", 1)[0]
    tied = model.config.tie_word_embeddings
    if name == "model.embed_tokens.weight":
        ql.install_embedding(model, None, t if t not in ql.FLOAT_TYPES else "F32", dtype, backend, tied=tied,
                             raw=data)
    elif name.endswith("layernorm.weight") or name == "model.norm.weight" or name.endswith(".bias"):
        setattr(model.get_submodule(module_name), name.rsplit(".", 1)[1], nn.Parameter(data.to(dtype)))
    elif t in ql.FLOAT_TYPES:
        lin = nn.Linear(data.shape[1], data.shape[0], bias=False, dtype=dtype, device=data.device)
        with torch.no_grad():
            lin.weight.copy_(data)
        ql.set_module(model, module_name, lin)
    else:
        ql.set_module(model, module_name, ql.QuantizedLinear(data, t, expected_shapes(model.config)[name][1],
                                                             dtype=dtype, backend=backend))
