"""`pocketlm.load`: one entry point for presets, checkpoint folders and weight files."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pocketlm.config import PRESETS, preset
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats import hf
from pocketlm.model import Phi3ForCausalLM


def load(path_or_preset: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
         device: str | torch.device = "cpu", seed: int = 0) -> Phi3ForCausalLM:
    """Load a model.

    Args:
        path_or_preset: a checkpoint folder in the official layout (or written by `pocketlm quantize`), a
            `.safetensors` file with `config.json` beside it, a `.gguf` file (phi3 or llama architecture,
            float or quantized tensors), or a preset name (see `pocketlm.config.PRESETS`), which builds a randomly initialised
            model with that exact structure.
        dtype: float32, float16 or bfloat16; default: the checkpoint's `torch_dtype` (the preset's for presets).
        device: where the weights live.
        seed: the random seed for presets.
    """
    spec = os.fspath(path_or_preset)
    path = Path(spec)
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            from pocketlm.quant.gguf_import import load_gguf  # phi3 and llama; float and quantized tensors
            return load_gguf(path, dtype=dtype, device=device)
        if path.is_file() and path.suffix != ".safetensors":
            raise WeightFormatError(f"{path}: not a model file; expected a checkpoint folder, a .safetensors "
                                    "file or a .gguf file")
        from pocketlm.quant.qcheckpoint import is_quantized_checkpoint, load_quantized
        folder = path if path.is_dir() else path.parent
        if is_quantized_checkpoint(folder):  # the scheme is read from the file's metadata, never from its name
            return load_quantized(folder, dtype=dtype, device=device)
        return hf.load_checkpoint(path, dtype=dtype, device=device)
    if spec in PRESETS:
        config = preset(spec)
        model = hf.empty_model(config, hf.resolve_dtype(dtype, config), device)
        return hf.init_weights(model, seed)
    raise ConfigError(f"{spec!r} is neither an existing path nor a preset; presets: {sorted(PRESETS)}")


def default_model_path() -> Path:
    """The embedded default model: `pocketlm/assets/default-model/` (official layout, bf16, made by
    `pocketlm recipe nano`; see its MODEL_CARD.md). Raises ConfigError when it is not installed."""
    folder = Path(__file__).resolve().parent / "assets" / "default-model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"the default model is not installed ({folder} has no config.json); name a model, or "
                          "make one with `pocketlm recipe nano --export-model " + str(folder) + "`")
    return folder
