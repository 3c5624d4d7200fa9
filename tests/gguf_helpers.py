"""Writing llama-arch GGUF files of pocketlm models in tests, laid out as llama.cpp's `LlamaModel` converter writes
them (split q/k/v and gate/up, the llama tokenizer metadata): shared by test_quant_gguf.py and
test_quant_mixed_parts.py."""

from __future__ import annotations

from typing import Callable

import numpy as np

import pocketlm
from pocketlm.formats.gguf import GGUFValueType
from pocketlm.quant import codecs
from pocketlm.quant.gguf_export import tokenizer_metadata
from pocketlm.quant.gguf_writer import GGUFWriter


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (applied to q with n_head, k with n_head_kv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path, tensor_type: Callable[[str, np.ndarray], str], *, context_length: int | None = None,
                     permute: bool = True) -> None:
    """A llama-arch GGUF of a pocketlm `model` at `path`; `tensor_type(gguf_name, array)` gives each tensor's type
    ("F32", "Q4_0", "Q6_K", ...). `permute`: q/k rows permuted as the converter does (False keeps the model's rows,
    which is a different but equally valid model where only file-level agreement is tested)."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = GGUFWriter(path)
    w.add_string("general.architecture", "llama")
    for k, v in (("context_length", context_length or c.max_position_embeddings), ("embedding_length", c.hidden_size),
                 ("feed_forward_length", c.intermediate_size), ("block_count", c.num_hidden_layers),
                 ("attention.head_count", c.num_attention_heads), ("attention.head_count_kv", c.num_key_value_heads),
                 ("rope.dimension_count", c.head_dim)):
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.rope.freq_base", c.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    meta = tokenizer_metadata(pocketlm.Tokenizer.default(), c.vocab_size)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", meta["tokens"], GGUFValueType.STRING)
    w.add_array("tokenizer.ggml.scores", meta["scores"], GGUFValueType.FLOAT32)
    w.add_array("tokenizer.ggml.token_type", meta["types"], GGUFValueType.INT32)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 32000)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    tensors = {}

    def put(name, arr):
        t = tensor_type(name, arr)
        w.add_tensor_info(name, arr.shape, t)
        tensors[name] = arr.astype(np.float32) if t == "F32" else codecs.quantize(arr, t)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = np.split(sd[p + "self_attn.qkv_proj.weight"], [nh * hd, nh * hd + nkv * hd])
        gate, up = np.split(sd[p + "mlp.gate_up_proj.weight"], 2)
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", permute_rows(q, nh) if permute else q)
        put(f"blk.{i}.attn_k.weight", permute_rows(k, nkv) if permute else k)
        put(f"blk.{i}.attn_v.weight", v)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", gate)
        put(f"blk.{i}.ffn_up.weight", up)
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    w.write(tensors)
