"""Export a pocketlm Phi-3 model (float or quantized) to a GGUF file that llama.cpp and Ollama load.

Metadata, tensor names and layout are those llama.cpp's converter writes for the `phi3` architecture
(`convert_hf_to_gguf.py` `Phi3MiniModel`, llama.cpp vendored in llama-cpp-python 0.3.36; phi3-spec §2.2):
`phi3.*` hyper-parameters, fused `attn_qkv` and `ffn_up` (= gate_up, gate rows first), `rope_factors_long/short`
F32 tensors and `phi3.rope.scaling.attn_factor` when the model has LongRoPE, `phi3.attention.sliding_window`
(0 when absent), no `output.weight` for tied embeddings (llama.cpp then reuses `token_embd`).

Tokenizer (`tokenizer.ggml.model = "llama"`, SentencePiece-style): tokens are the pieces, then the added
tokens, then `[PAD{i}]` rows up to the embedding size (type UNUSED, score -10000, as the converter writes them).
Token types follow the converter: added tokens CONTROL when special else USER_DEFINED (score -1000), `<0xNN>`
pieces BYTE (score 0), other pieces NORMAL.
Deviation: `pocketlm.Tokenizer` keeps BPE merges, not SentencePiece scores, so the NORMAL scores are rebuilt
from the merge order: a piece made by merge rank r scores -r (the first merge that makes it), pieces no merge
makes score below every merged piece. llama.cpp's SPM tokenizer merges the highest-scoring bigram first, so it
then follows the same priority order as pocketlm's BPE (the official scores, with ties among equal scores, only
approximate it).

Our own keys, which other readers ignore: `pocketlm.scheme` (the `pocketlm quantize` scheme) and
`pocketlm.keep_embeddings`. Every tensor's ggml type is recorded per tensor, so the scheme is never guessed.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from pocketlm.chat import template_text
from pocketlm.engine.sampling import GGUF_PENALTY_LAST_N, GGUF_PENALTY_REPEAT
from pocketlm.errors import WeightFormatError
from pocketlm.formats.gguf import GGUFValueType
from pocketlm.formats.gguf_model import TENSOR_NAMES
from pocketlm.quant import linear as ql
from pocketlm.quant.gguf_writer import GGUFWriter

# SentencePiece token types (gguf `TokenType`)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# llama.cpp `LlamaFileType` for general.file_type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 14, "Q4_K_M": 15,
              "Q5_K": 16, "Q6_K": 18, "IQ4_NL": 25, "BF16": 32}
CHECKPOINT_TO_GGUF = {v: k for k, v in TENSOR_NAMES.items()}


def gguf_name(name: str) -> str:
    """Checkpoint name -> GGUF tensor name (`model.layers.3.mlp.gate_up_proj.weight` -> `blk.3.ffn_up.weight`)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        key = ".".join(["model", "layers", "{i}", *parts[3:]])
        if key in CHECKPOINT_TO_GGUF:
            return CHECKPOINT_TO_GGUF[key].format(i=int(parts[2]))
    if name in CHECKPOINT_TO_GGUF:
        return CHECKPOINT_TO_GGUF[name]
    raise WeightFormatError(f"tensor {name!r} has no GGUF name in the phi3 table")


def tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """tokens / scores / token_type arrays and special ids of a `pocketlm.Tokenizer`, padded to `n_vocab`."""
    size = len(tokenizer)
    if size > n_vocab:
        raise WeightFormatError(f"the tokenizer defines {size} ids but the model has only {n_vocab} embedding rows")
    doc = json.loads(tokenizer.to_tokenizer_json())
    vocab = doc["model"]["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in doc["model"]["merges"]]
    n_merges = len(merges)
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    added = {t["id"]: t for t in doc["added_tokens"]}
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        if i >= size:
            tokens.append(f"[PAD{i}]"), scores.append(-10000.0), types.append(UNUSED)
        elif i in added:
            tokens.append(added[i]["content"]), scores.append(-1000.0)
            types.append(CONTROL if added[i]["special"] else USER_DEFINED)
        else:
            piece = tokenizer.id_to_token(i)
            assert vocab.get(piece) == i, (piece, i)
            tokens.append(piece)
            if piece.startswith("<0x") and len(piece) == 6 and piece.endswith(">"):
                scores.append(0.0), types.append(BYTE)
            else:
                scores.append(-float(first_rank.get(piece, n_merges + i))), types.append(NORMAL)
    return {"tokens": tokens, "scores": scores, "types": types, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
            "unk": tokenizer.unk_id, "pad": tokenizer.pad_id, "add_bos": tokenizer.add_bos_default}


def write_bpe_tokenizer(w: GGUFWriter, tokenizer, c) -> None:
    """The `tokenizer.*` keys of a byte-level BPE vocabulary (llama.cpp's "gpt2" model with the "smollm"
    pre-tokenizer that `ByteLevelBPETokenizer` implements: tokens, token types, merges in rank order) and the chat
    template of config `c`. The vocabulary must fill the embedding exactly (no padding rows)."""
    if len(tokenizer) != c.vocab_size:
        raise WeightFormatError(f"the tokenizer defines {len(tokenizer)} ids but the model has {c.vocab_size} "
                                "embedding rows; a byte-level vocabulary is written unpadded")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokenizer.tokens, GGUFValueType.STRING)
    w.add_array("tokenizer.ggml.token_type", tokenizer.token_types, GGUFValueType.INT32)
    w.add_array("tokenizer.ggml.merges", [f"{a} {b}" for a, b in tokenizer.merges], GGUFValueType.STRING)
    _write_special_ids(w, c, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id,
                       tokenizer.add_bos_default)


def write_tokenizer(w: GGUFWriter, tokenizer, c) -> None:
    """The `tokenizer.*` keys (llama.cpp's SentencePiece "llama" vocabulary, or a byte-level BPE one through
    `write_bpe_tokenizer`) and the chat template of config `c`."""
    from pocketlm.quant.gguf_tokenizer import ByteLevelBPETokenizer
    if isinstance(tokenizer, ByteLevelBPETokenizer):
        return write_bpe_tokenizer(w, tokenizer, c)
    tok = tokenizer_metadata(tokenizer, c.vocab_size)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tok["tokens"], GGUFValueType.STRING)
    w.add_array("tokenizer.ggml.scores", tok["scores"], GGUFValueType.FLOAT32)
    w.add_array("tokenizer.ggml.token_type", tok["types"], GGUFValueType.INT32)
    _write_special_ids(w, c, tok["bos"], tok["eos"], tok["unk"], tok["pad"], tok["add_bos"])


def _write_special_ids(w: GGUFWriter, c, bos, eos, unk, pad, add_bos: bool) -> None:
    """The special ids that exist, the add-BOS/EOS flags and the chat template of config `c` (both vocabularies)."""
    for key, value in (("bos_token_id", bos), ("eos_token_id", eos), ("unknown_token_id", unk),
                       ("padding_token_id", pad)):
        if value is not None:
            w.add_uint32(f"tokenizer.ggml.{key}", value)
    w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_string("tokenizer.chat_template", template_text(c.chat_format))


def _float_bytes(t: torch.Tensor, type_name: str) -> np.ndarray:
    t = t.detach().cpu()
    if type_name == "F32":
        return t.float().numpy()
    if type_name == "F16":
        return t.to(torch.float16).numpy()
    if type_name == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    raise AssertionError(type_name)


def _model_tensors(model, scheme: str | None, keep_embeddings: str | None) -> dict[str, tuple[str, tuple, object]]:
    """checkpoint name -> (ggml type, shape, producer of the bytes), in checkpoint order."""
    out: dict[str, tuple[str, tuple, object]] = {}
    emb = model.model.embed_tokens
    tied = model.config.tie_word_embeddings

    def plan(name: str, module) -> None:
        if isinstance(module, (ql.QuantizedLinear, ql.QuantizedEmbedding)):
            rows = module.qweight.shape[0]
            cols = module.in_features if isinstance(module, ql.QuantizedLinear) else module.embedding_dim
            out[name] = (module.type_name, (rows, cols), lambda m=module: m.qweight.cpu().numpy())
            return
        w = module.weight
        t = ql.tensor_type(scheme or _float_scheme(w.dtype), name, tuple(w.shape), keep_embeddings,
                           num_layers=model.config.num_hidden_layers, tied=tied)
        if t in ql.FLOAT_TYPES:
            out[name] = (t, tuple(w.shape), lambda w=w, t=t: _float_bytes(w, t))
        else:
            out[name] = (t, tuple(w.shape), lambda w=w, t=t: ql.quantize_tensor(w, t).numpy())

    plan("model.embed_tokens.weight", emb)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        for name, module in ((p + "input_layernorm.weight", layer.input_layernorm),
                             (p + "self_attn.qkv_proj.weight", layer.self_attn.qkv_proj),
                             (p + "self_attn.o_proj.weight", layer.self_attn.o_proj),
                             (p + "post_attention_layernorm.weight", layer.post_attention_layernorm),
                             (p + "mlp.gate_up_proj.weight", layer.mlp.gate_up_proj),
                             (p + "mlp.down_proj.weight", layer.mlp.down_proj)):
            if name.endswith("layernorm.weight"):
                out[name] = ("F32", tuple(module.weight.shape), lambda w=module.weight: _float_bytes(w, "F32"))
            else:
                plan(name, module)
    out["model.norm.weight"] = ("F32", tuple(model.model.norm.weight.shape),
                                lambda w=model.model.norm.weight: _float_bytes(w, "F32"))
    if not tied:
        plan("lm_head.weight", model.lm_head)
    return out


def _float_scheme(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


def check_exportable(config) -> None:
    """Refuse architectures llama.cpp cannot load: writing a GGUF file no one can run helps nobody."""
    if getattr(config, "model_type", "phi3") == "phi3small":
        raise WeightFormatError(
            f"{config.name or 'this model'} is Phi-3-small (model_type 'phi3small'): llama.cpp has no architecture "
            "for it (no block-sparse attention, GEGELU or muP scaling in its graph), so a GGUF file would load "
            "nowhere; quantize to pocketlm's quantized safetensors instead: "
            "pocketlm quantize MODEL OUT --format safetensors")


def export_gguf(model, path: str | os.PathLike, *, tokenizer=None, scheme: str | None = None,
                keep_embeddings: str | None = None, name: str | None = None) -> dict[str, str]:
    """Write `model` (a `Phi3ForCausalLM`, float or quantized with `quant.linear`) as a phi3 GGUF file.

    Args:
        tokenizer: a `pocketlm.Tokenizer` (default: the bundled Phi-3 tokenizer).
        scheme: `pocketlm quantize` scheme for float weights (one of `quant.linear.SCHEMES`); None keeps the
            model's float dtype. Already-quantized layers are written with their own bytes and type.
        keep_embeddings: type of token_embd/output for float weights (f32/f16/bf16/q8_0).
        name: `general.name` (default: the config's name).

    Returns: GGUF tensor name -> ggml type written.
    """
    from pocketlm.tokenizer import Tokenizer

    c = model.config
    check_exportable(c)
    if getattr(c, "is_moe", False):  # phi-3.5-MoE: llama.cpp's `phimoe` layout (quant.gguf_phimoe)
        from pocketlm.quant.gguf_phimoe import export_phimoe_gguf
        if keep_embeddings is not None:
            raise WeightFormatError("keep_embeddings is not supported for phi-3.5-MoE GGUF export")
        return export_phimoe_gguf(model, path, tokenizer=tokenizer, scheme=scheme, name=name)
    tokenizer = tokenizer if tokenizer is not None else Tokenizer.default()
    tensors = _model_tensors(model, scheme, keep_embeddings)
    major = ql.SCHEMES[scheme] if scheme is not None else _major_type(tensors)  # what the user asked for
    w = GGUFWriter(path)
    w.add_string("general.architecture", "phi3")
    if name or c.name:
        w.add_string("general.name", name or c.name)
    w.add_uint32("phi3.context_length", c.max_position_embeddings)
    w.add_uint32("phi3.rope.scaling.original_context_length", c.original_max_position_embeddings)
    w.add_uint32("phi3.embedding_length", c.hidden_size)
    w.add_uint32("phi3.feed_forward_length", c.intermediate_size)
    w.add_uint32("phi3.block_count", c.num_hidden_layers)
    w.add_uint32("phi3.attention.head_count", c.num_attention_heads)
    w.add_uint32("phi3.attention.head_count_kv", c.num_key_value_heads)
    w.add_float32("phi3.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_uint32("phi3.rope.dimension_count", c.rotary_dim)
    w.add_float32("phi3.rope.freq_base", c.rope_theta)
    w.add_uint32("general.file_type", FILE_TYPES.get("Q4_K_M" if scheme == "q4_k_m" else major, 1))
    w.add_uint32("phi3.attention.sliding_window", c.sliding_window or 0)
    if c.rope_scaling is not None:
        w.add_float32("phi3.rope.scaling.attn_factor", c.rope_attention_factor)
    w.add_uint32("general.quantization_version", 2)
    penalty = getattr(model, "declared_repetition_penalty", None)
    if penalty is not None:  # the model's own generation default (sampling.model_repetition_penalty), as llama.cpp
        w.add_float32(GGUF_PENALTY_REPEAT, penalty)  # reads it: over the whole context
        w.add_int32(GGUF_PENALTY_LAST_N, -1)
    if scheme is not None:
        w.add_string("pocketlm.scheme", scheme)
    if keep_embeddings is not None:
        w.add_string("pocketlm.keep_embeddings", keep_embeddings)
    write_tokenizer(w, tokenizer, c)

    producers = {}
    written = {}
    for ckpt, (t, shape, produce) in tensors.items():
        g = gguf_name(ckpt)
        w.add_tensor_info(g, shape, t)
        producers[g] = produce
        written[g] = t
    if c.rope_scaling is not None:
        for g, factors in (("rope_factors_long.weight", c.rope_scaling.long_factor),
                           ("rope_factors_short.weight", c.rope_scaling.short_factor)):
            arr = np.asarray(factors, dtype=np.float32)
            w.add_tensor_info(g, arr.shape, "F32")
            producers[g] = lambda a=arr: a
            written[g] = "F32"
    w.write(lambda g: producers[g]())
    return written


def _major_type(tensors: dict) -> str:
    """The type of most weight bytes among the 2-D tensors (for general.file_type)."""
    counts: dict[str, int] = {}
    for t, shape, _ in tensors.values():
        if len(shape) == 2:
            counts[t] = counts.get(t, 0) + math.prod(shape)
    return max(counts, key=counts.get) if counts else "F32"
