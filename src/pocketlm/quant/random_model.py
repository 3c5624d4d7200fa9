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


# K-quants: (byte offset, f16 value) of the super-block scales. Q4_K/Q5_K: d, dmin with w = d*sc*q - dmin*m
# (sc, m ~ 32, q ~ 7.5 or ~15); Q6_K: d with w = d*sc*(q-32), |sc| ~ 64
K_SCALES = {"Q4_K": ((0, 1.5e-4), (2, 1.1e-3)), "Q5_K": ((0, 1.5e-4), (2, 1.1e-3)), "Q6_K": ((208, 1.6e-5),)}
# Q5_0: w = d*(q-16); Q5_1: w = d*q + m (m at byte 2); IQ4_NL: w = d*kvalues_iq4nl[q] (|value| ~ 60)
BLOCK32_SCALES = {"Q5_0": ((0, 2.2e-3),), "Q5_1": ((0, 2.2e-3), (2, -3.4e-2)), "IQ4_NL": ((0, 3.0e-4),)}


def random_bytes(type_name: str, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, cols/block*size) GGUF bytes of `type_name` (Q4_0, Q8_0, Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K or Q6_K)
    with random codes and fixed scales."""
    fixed = {**K_SCALES, **BLOCK32_SCALES}
    if type_name not in SCALES and type_name not in fixed:
        raise ql.QuantError(f"random models are made in {sorted(SCALES) + sorted(fixed)}, not {type_name}")
    block, size = codecs.BLOCK[type_name]
    nb = cols // block
    raw = torch.randint(0, 256, (rows, nb, size), dtype=torch.uint8, generator=generator)
    scales = fixed.get(type_name, ((0, SCALES.get(type_name)),))
    for offset, value in scales:
        raw[..., offset:offset + 2] = torch.tensor([value], dtype=torch.float16).view(torch.uint8).reshape(1, 1, 2)
    return raw.reshape(rows, nb * size)


def random_quantized_model(config: Phi3Config, type_name: str = "Q4_0", *, seed: int = 0, backend: str = "auto",
                           down_and_output: str | None = None) -> Phi3ForCausalLM:
    """A `Phi3ForCausalLM` of `config` whose every weight matrix (embedding and lm_head included) is random
    `type_name` codes; norms are ones. `down_and_output` gives mlp.down_proj and lm_head another type, as
    llama.cpp's *_K_M files do (Q6_K there)."""
    other = down_and_output or type_name
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.rotary_emb = RotaryEmbedding(config)
    for layer in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            layer.get_submodule(name).weight = nn.Parameter(torch.ones(config.hidden_size))
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            t = other if name == "mlp.down_proj" else type_name
            lin = layer.get_submodule(name)
            raw = random_bytes(t, lin.out_features, lin.in_features, g)
            ql.set_module(layer, name, ql.QuantizedLinear(raw, t, lin.in_features, backend=backend))
    model.model.norm.weight = nn.Parameter(torch.ones(config.hidden_size))
    emb = random_bytes(type_name, config.vocab_size, config.hidden_size, g)
    ql.install_embedding(model, None, type_name, torch.float32, backend, tied=config.tie_word_embeddings, raw=emb)
    if not config.tie_word_embeddings:
        model.lm_head = ql.QuantizedLinear(random_bytes(other, config.vocab_size, config.hidden_size, g),
                                           other, config.hidden_size, backend=backend)
    return model.eval()


def write_random_gguf(config: Phi3Config, path: str | os.PathLike, type_name: str = "Q4_0", *, seed: int = 0,
                      down_and_output: str | None = None) -> None:
    """Write `random_quantized_model(config, type_name, down_and_output=...)` as a phi3 GGUF file (atomic via the
    GGUF writer)."""
    from pocketlm.quant.gguf_export import export_gguf
    model = random_quantized_model(config, type_name, seed=seed, backend="reference", down_and_output=down_and_output)
    export_gguf(model, path, name=f"random-{config.name or 'model'}-{type_name.lower()}")
