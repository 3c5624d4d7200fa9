"""Quantized models with random codes, for speed and memory measurements at real shapes (phi-3-mini: 3.8B).

Building phi-3-mini in float32 and quantizing it would need ~15 GB and minutes; these models are built on the
meta device and get random 4-bit / 8-bit codes with one fixed scale per block directly, in the GGUF byte layout,
so a Q4_0 phi-3-mini-shaped model costs its 2.15 GB and a few seconds. The weights are noise (the text is
meaningless) but every byte is read exactly as a trained model's would be, so tokens/s and resident memory
are the real ones. `write_random_gguf` writes such a model as a phi3 GGUF file that llama.cpp loads, so both
engines run the same bytes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pocketlm.config import Phi3Config
from pocketlm.model import Phi3ForCausalLM, RotaryEmbedding
from pocketlm.quant import codecs
from pocketlm.quant import linear as ql

# block scale so that weights have a standard deviation of about 0.02 (codes uniform around the zero point)
SCALES = {"Q4_0": 0.0043, "Q8_0": 0.00027}


def random_bytes(type_name: str, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, cols/32*block) GGUF bytes of `type_name` (Q4_0 or Q8_0) with random codes and a fixed scale."""
    if type_name not in SCALES:
        raise ql.QuantError(f"random models are made in {sorted(SCALES)}, not {type_name}")
    block, size = codecs.BLOCK[type_name]
    nb = cols // block
    raw = torch.randint(0, 256, (rows, nb, size), dtype=torch.uint8, generator=generator)
    raw[..., :2] = torch.full((rows, nb), SCALES[type_name], dtype=torch.float16).view(torch.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * size)


def random_quantized_model(config: Phi3Config, type_name: str = "Q4_0", *, seed: int = 0,
                           backend: str = "auto") -> Phi3ForCausalLM:
    """A `Phi3ForCausalLM` of `config` whose every weight matrix (embedding and lm_head included) is random
    `type_name` codes; norms are ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.rotary_emb = RotaryEmbedding(config)
    for layer in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            layer.get_submodule(name).weight = nn.Parameter(torch.ones(config.hidden_size))
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            lin = layer.get_submodule(name)
            raw = random_bytes(type_name, lin.out_features, lin.in_features, g)
            ql.set_module(layer, name, ql.QuantizedLinear(raw, type_name, lin.in_features, backend=backend))
    model.model.norm.weight = nn.Parameter(torch.ones(config.hidden_size))
    emb = random_bytes(type_name, config.vocab_size, config.hidden_size, g)
    ql.install_embedding(model, None, type_name, torch.float32, backend, tied=config.tie_word_embeddings, raw=emb)
    if not config.tie_word_embeddings:
        model.lm_head = ql.QuantizedLinear(random_bytes(type_name, config.vocab_size, config.hidden_size, g),
                                           type_name, config.hidden_size, backend=backend)
    return model.eval()


def write_random_gguf(config: Phi3Config, path: str | os.PathLike, type_name: str = "Q4_0", *, seed: int = 0) -> None:
    """Write `random_quantized_model(config, type_name)` as a phi3 GGUF file (atomic via the GGUF writer)."""
    from pocketlm.quant.gguf_export import export_gguf
    model = random_quantized_model(config, type_name, seed=seed, backend="reference")
    export_gguf(model, path, name=f"random-{config.name or 'model'}-{type_name.lower()}")
