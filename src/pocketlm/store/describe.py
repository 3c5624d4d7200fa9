"""Facts about a model's weights without loading them: format, quantization, architecture, size, licence."""

from __future__ import annotations

import json
from pathlib import Path

from pocketlm.errors import PocketLMError, StoreError


def config_and_info(weights: Path):
    """(Phi3Config, facts) of a checkpoint folder, .safetensors file or .gguf file; reads headers only."""
    from pocketlm.config import Phi3Config
    if weights.is_file() and weights.suffix == ".gguf":
        from pocketlm.formats.gguf_model import gguf_config
        from pocketlm.formats.gguf import GGUFFile
        config, info = gguf_config(weights)
        with GGUFFile(weights) as g:
            arch = str(g.metadata.get("general.architecture", "unknown"))
        types = [t for t in info["file_dtypes"] if t not in ("F32",)] or info["file_dtypes"]
        return config, {"format": "gguf", "quantization": ", ".join(types), "architecture": f"{arch} (GGUF)"}
    folder = weights if weights.is_dir() else weights.parent
    from pocketlm import vision
    if vision.is_vision_model(folder):  # phi-3.5-vision: the language model's config, the whole model's count
        config = vision.Phi3VConfig.from_folder(folder).text
    else:
        config = Phi3Config.from_json_file(folder / "config.json")
    arch = (json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or ["?"])[0]
    from pocketlm.quant.qcheckpoint import SCHEME_KEY, is_quantized_checkpoint
    from pocketlm.formats.safetensors_io import CheckpointReader, read_header
    if is_quantized_checkpoint(folder):
        scheme = read_header(folder / "model.safetensors").metadata.get(SCHEME_KEY, "quantized")
        return config, {"format": "safetensors (pocketlm quantized)", "quantization": scheme.upper(),
                        "architecture": arch}
    with CheckpointReader(weights) as r:
        dtypes = sorted({str(r.dtype(k)).replace("torch.", "") for k in r.keys()})
    return config, {"format": "safetensors", "quantization": ", ".join(dtypes), "architecture": arch}


def check_loadable(weights: Path) -> None:
    """Raise StoreError when pocketlm cannot read `weights` as a model (checked on headers, before any copy)."""
    try:
        config_and_info(weights)
    except (PocketLMError, OSError) as e:
        raise StoreError(f"{weights}: not a model pocketlm can run: {e}") from None


def describe_weights(weights: Path) -> dict:
    """The manifest fields of `weights`: format, quantization, architecture, parameters, context, chat format."""
    config, info = config_and_info(weights)
    from pocketlm import vision
    folder = weights if weights.is_dir() else weights.parent
    parameters = (vision.describe(folder)["parameters"] if weights.suffix != ".gguf" and vision.is_vision_model(folder)
                  else config.num_parameters())
    return dict(info, parameters=parameters, context_length=config.max_position_embeddings,
                chat_format=config.chat_format)


def licence_of(folder: Path, weights: Path) -> str | None:
    """The model's licence: a LICENSE file beside the weights, else the GGUF's general.license, else the
    config's `license` field."""
    for name in ("LICENSE", "LICENSE.md", "LICENSE.txt"):
        f = folder / name
        if f.is_file():
            return f.read_text(encoding="utf-8", errors="replace")
    if weights.is_file() and weights.suffix == ".gguf":
        from pocketlm.formats.gguf import GGUFFile
        with GGUFFile(weights) as g:
            value = g.metadata.get("general.license")
        return str(value) if value else None
    try:
        value = json.loads((folder / "config.json").read_text()).get("license")
    except (OSError, ValueError):
        return None
    return str(value) if value else None
