"""`pocketlm.load`: one entry point for presets, checkpoint folders and weight files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from pocketlm.config import PRESETS, preset
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats import hf
from pocketlm.model import Phi3ForCausalLM


QUANTIZE_SCHEMES = ("q4_0", "q4_k", "q8_0")
"""The schemes `load(..., quantize=)` (and `pocketlm run/chat/serve --quantize`) apply while loading."""


def check_quantize_scheme(scheme: str | None) -> None:
    """Raise ConfigError naming the valid schemes when `scheme` is not None and not one of QUANTIZE_SCHEMES."""
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        raise ConfigError(f"quantize scheme {scheme!r} is not supported; choose from {', '.join(QUANTIZE_SCHEMES)}")


def load(path_or_preset: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
         device: str | torch.device = "cpu", seed: int = 0, quantize: str | None = None) -> Phi3ForCausalLM:
    """Load a model.

    Args:
        path_or_preset: None (the default): the embedded default model (`default_model_path()`, computed in
            float32 unless `dtype` says otherwise, as `pocketlm run` does); a checkpoint folder in the official
            layout (or written by `pocketlm quantize`), a `.safetensors` file with `config.json` beside it, a
            `.gguf` file (phi3 or llama architecture, float or quantized tensors), a preset name (see
            `pocketlm.config.PRESETS`), which builds a randomly initialised model with that exact structure, or
            the name of a model in the store (`pocketlm list`).
        dtype: float32, float16 or bfloat16; default: the checkpoint's `torch_dtype` (the preset's for presets).
        device: where the weights live.
        seed: the random seed for presets.
        quantize: None (weights as stored), or one of QUANTIZE_SCHEMES ("q4_k", "q8_0", "q4_0"): float weight
            matrices are quantized while loading, by the rule `pocketlm quantize` uses (norms stay float), and run
            on the CPU kernels. A checkpoint folder is streamed tensor by tensor (peak memory: the quantized model
            plus one float tensor); a float GGUF file or a preset is loaded, then quantized. Already-quantized
            files are refused (requantizing loses quality).
    """
    check_quantize_scheme(quantize)
    if path_or_preset is None:
        return load(default_model_path(), dtype=dtype if dtype is not None else "float32", device=device,
                    quantize=quantize)
    from pocketlm import vision  # phi-3.5-vision: a vision preset or a phi3_v checkpoint folder
    if vision.is_vision_model(path_or_preset):  # --quantize: the language model only, the image tower stays float
        return vision.load(path_or_preset, dtype=dtype, device=device, seed=seed, quantize=quantize)
    spec = os.fspath(path_or_preset)
    path = gguf_folder_file(spec) or Path(spec)
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            from pocketlm.formats.gguf_model import load_gguf  # phi3 and llama; float and quantized tensors
            if quantize is not None and gguf_checkpoint_dtype(path)[1]:
                raise ConfigError(f"{path}: already quantized; --quantize {quantize} applies to float weights "
                                  "(load the file as it is)")
            return _quantized(load_gguf(path, dtype=dtype, device=device), quantize)
        if path.is_file() and path.suffix != ".safetensors":
            raise WeightFormatError(f"{path}: not a model file; expected a checkpoint folder, a .safetensors "
                                    "file or a .gguf file")
        from pocketlm.quant.qcheckpoint import is_quantized_checkpoint, load_quantized
        folder = path if path.is_dir() else path.parent
        if is_quantized_checkpoint(folder):  # the scheme is read from the file's metadata, never from its name
            if quantize is not None:
                raise ConfigError(f"{path}: already quantized; --quantize {quantize} applies to float weights "
                                  "(load the folder as it is)")
            return load_quantized(folder, dtype=dtype, device=device)
        return hf.load_checkpoint(path, dtype=dtype, device=device, quantize=quantize)
    if spec in PRESETS:
        config = preset(spec)
        compute = "float32" if dtype is None and quantize is not None else dtype  # as quantized files load
        model = hf.empty_model(config, hf.resolve_dtype(compute, config), device)
        return _quantized(hf.init_weights(model, seed), quantize)
    from pocketlm.errors import ModelNotFoundError
    from pocketlm.store import resolve  # a name in the model store (phi3:mini, a `pocketlm create`d model)
    try:
        entry = resolve(spec)
    except ModelNotFoundError as e:
        raise ConfigError(str(e)) from None
    if entry is not None:
        return load(entry.weights, dtype=dtype, device=device, seed=seed, quantize=quantize)
    raise ConfigError(f"{spec!r} is neither an existing path nor a preset; presets: {sorted(PRESETS)}")


def _quantized(model: Phi3ForCausalLM, scheme: str | None) -> Phi3ForCausalLM:
    """`model` with its float weight matrices quantized to `scheme` in place (None: unchanged)."""
    if scheme is None:
        return model
    from pocketlm.quant.linear import quantize_model
    return quantize_model(model, scheme)


_WARNED_PRESETS: set[str] = set()


def warn_random_weights(name: str) -> None:
    """Say once per process (on stderr) that a preset is a structure with random weights, not a trained model:
    its text is noise, and a checkpoint written from it holds random numbers. The CLI calls this for the verbs
    that use a model's weights (run, chat, serve, eval, convert, quantize); training from a preset, which starts
    from random weights on purpose, does not."""
    if name in _WARNED_PRESETS:
        return
    _WARNED_PRESETS.add(name)
    print(f"pocketlm: warning: {name!r} is a preset: the {name} structure with RANDOM weights (not a trained "
          "model): its text is noise and a file written from it holds random numbers. Name a checkpoint folder or "
          ".gguf file for real weights, or omit MODEL for the embedded default model.", file=sys.stderr)


# The one name of the embedded default model wherever a name is shown: chat's banner, serve's model id, eval's
# chart (its config.json `_name_or_path`), the folder itself.
DEFAULT_MODEL_NAME = "default-model"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / DEFAULT_MODEL_NAME


def gguf_folder_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file of a folder that holds exactly one `.gguf` file and no `config.json` (the default model's
    folder, a folder of downloaded GGUF weights); None for anything else."""
    p = Path(path)
    if not p.is_dir() or (p / "config.json").exists():
        return None
    files = sorted(f for f in p.glob("*.gguf") if f.is_file())
    return files[0] if len(files) == 1 else None


def default_model_path() -> Path:
    """The embedded default model: the folder `pocketlm/assets/default-model/`, holding either a checkpoint
    (config.json and weights) or exactly one GGUF file (`gguf_folder_file`); see its MODEL_CARD.md. Raises
    ConfigError when it is not installed."""
    folder = DEFAULT_MODEL_DIR
    if not (folder / "config.json").is_file() and gguf_folder_file(folder) is None:
        raise ConfigError(f"the default model is not installed ({folder} has neither a config.json nor one .gguf "
                          "file); name a model, or make one with `pocketlm distill ... --export "
                          f"{folder}/model.q4_0.gguf`")
    return folder


_GGUF_FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def gguf_checkpoint_dtype(path: str | os.PathLike) -> tuple[str, bool]:
    """(the dtype a GGUF file's weight matrices are stored in, whether any of them is quantized).

    The matrices decide (llama.cpp keeps the 1-D norms in F32 whatever the file type): all F16 -> float16, all
    BF16 -> bfloat16; anything else, and quantized files, float32: a quantized block's values (an f16 scale
    times a small integer) are exact in float32, not in float16 or bfloat16."""
    from pocketlm.formats.gguf import GGML_TYPES, GGUFFile
    with GGUFFile(path) as g:
        types = {GGML_TYPES[t.ggml_type].name for t in g.tensors.values() if len(t.shape) >= 2}
    quantized = bool(types - set(_GGUF_FLOAT_DTYPES))
    if not quantized and len(types) == 1:
        return _GGUF_FLOAT_DTYPES[types.pop()], False
    return "float32", quantized


def load_for_conversion(path_or_preset: str | os.PathLike, *, dtype: str | None = None) -> tuple[Phi3ForCausalLM, str]:
    """The model `pocketlm convert` writes, and the dtype to write it in: `dtype`, else the checkpoint's own.

    Every weight is a plain float tensor: a quantized GGUF is dequantized (to float32 unless `dtype` says
    otherwise), so that the official layout can hold it. Loading happens before anything is written."""
    spec = os.fspath(path_or_preset)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        from pocketlm.formats.gguf_model import load_gguf
        own, quantized = gguf_checkpoint_dtype(path)
        target = dtype or own
        if quantized:
            print(f"pocketlm: {path.name} is quantized; its weights are dequantized to {target}", file=sys.stderr)
        return load_gguf(path, dtype=target, dequantize=True), target
    model = load(spec, dtype=dtype)
    from pocketlm.quant.linear import QuantizedEmbedding, QuantizedLinear
    if any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules()):
        raise WeightFormatError(f"{spec}: a quantized checkpoint; `pocketlm convert` writes float weights only "
                                "(convert the GGUF file instead, or the float checkpoint it was made from)")
    own = {v: k for k, v in hf.DTYPES.items()}.get(next(model.parameters()).dtype, "float32")
    return model, dtype or own
