"""The official Hugging Face checkpoint layout for Phi-3: `config.json` + `model.safetensors` (or shards with
`model.safetensors.index.json`), optionally with the tokenizer files beside them.

The one name/shape table lives here (`expected_shapes`); pocketlm's module names are the checkpoint's names
(phi3-spec §2.1), so no renaming happens. Loading first checks config.json against the safetensors headers
(`check_files_match`: layers, embedding shape, every tensor's shape), then builds the model on the meta device and
fills it one tensor at a time from memory-mapped files, so it never needs twice the model's memory.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch

from pocketlm.config import Phi3Config
from pocketlm.errors import WeightFormatError
from pocketlm.formats.safetensors_io import CheckpointReader, write_checkpoint
from pocketlm.model import Phi3ForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# generation_config.json of the instruct checkpoints: stop on <|endoftext|>, <|assistant|>, <|end|>
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}


def index_spans(indices: set[int]) -> str:
    """Layer indices for a message: {0, 1, 2, 5} -> "0-2, 5" (at most 4 spans; "none" when empty)."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:4])
    return (text + ", ...") if len(spans) > 4 else text or "none"


def expected_shapes(config: Phi3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Phi-3 checkpoint with its shape (PyTorch order: Linear weights are (out, in))."""
    h, i, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    if config.model_type == "phi3small":  # biased fused projections, LayerNorms with bias (model_small.py)
        from pocketlm.model_small import checkpoint_shapes
        return checkpoint_shapes(config)
    if config.is_moe:
        return _phimoe_shapes(config)
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = (qkv_rows, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, config.num_attention_heads * hd)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _phimoe_shapes(config: Phi3Config) -> dict[str, tuple[int, ...]]:
    """The phi-3.5-MoE checkpoint (PhiMoEForCausalLM): separate biased q/k/v/o projections, LayerNorm weight and
    bias, `block_sparse_moe.gate` and `block_sparse_moe.experts.E.w1/w2/w3`, lm_head with bias."""
    h, i, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    norm_keys = ("weight", "bias") if config.layer_norm else ("weight",)
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        for key in norm_keys:
            shapes[p + f"input_layernorm.{key}"] = (h,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, h)
            if config.attention_bias:
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        for key in norm_keys:
            shapes[p + f"post_attention_layernorm.{key}"] = (h,)
        shapes[p + "block_sparse_moe.gate.weight"] = (config.num_local_experts, h)
        for e in range(config.num_local_experts):
            x = p + f"block_sparse_moe.experts.{e}."
            shapes[x + "w1.weight"], shapes[x + "w2.weight"], shapes[x + "w3.weight"] = (i, h), (h, i), (i, h)
    for key in norm_keys:
        shapes[f"model.norm.{key}"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    if config.lm_head_bias:
        shapes["lm_head.bias"] = (v,)
    return shapes


def generation_config(config: Phi3Config, repetition_penalty: float | None = None, tokenizer=None) -> dict:
    """generation_config.json: the Phi-3 instruct stop ids, or for Phi-3-small <|endoftext|> and <|end|> (the
    ids its chat turns end with, tokenizer_small.py); a model with another vocabulary (the ChatML default model,
    eos_token_id not Phi-3's 32000) gets its own config's bos/eos/pad ids, its eos widened to the ids that end a
    chat turn when its tokenizer is given (`chat.stop_token_ids`: <|im_end|> and the eos). With
    `repetition_penalty` (a model's declared one, see `declared_repetition_penalty_of`) that field too, as HF
    transformers' generate reads it."""
    if config.model_type == "phi3small":
        out = {"bos_token_id": 100257, "eos_token_id": [100257, 100266]}
    elif config.eos_token_id in (None, 32000):
        out = dict(GENERATION_CONFIG)
    else:
        eos = config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if tokenizer is not None:
            from pocketlm.chat import stop_token_ids
            from pocketlm.errors import ChatFormatError
            try:
                eos = list(dict.fromkeys(stop_token_ids(tokenizer) + eos))
            except ChatFormatError:  # no chat control tokens: the config's eos alone
                pass
        out = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
               "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos[0]}
    if repetition_penalty is not None:
        out["repetition_penalty"] = repetition_penalty
    return out


def declared_repetition_penalty_of(folder: str | os.PathLike) -> float | None:
    """The `repetition_penalty` a checkpoint folder's generation_config.json declares (HF's generate applies it
    over the whole sequence, as pocketlm does), or None: no file, no field, 1.0, or not a number > 0. A
    generation_config.json that is not valid JSON raises WeightFormatError naming it."""
    from pocketlm.engine.sampling import declared_repetition_penalty
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFormatError(f"{path}: not a readable JSON file ({e})") from None
    return declared_repetition_penalty(data.get("repetition_penalty")) if isinstance(data, dict) else None


def model_class(config: Phi3Config) -> type:
    """The module class of a config's architecture: Phi3ForCausalLM, or Phi3SmallForCausalLM (model_type
    "phi3small")."""
    if config.model_type == "phi3small":
        from pocketlm.model_small import Phi3SmallForCausalLM
        return Phi3SmallForCausalLM
    return Phi3ForCausalLM


def resolve_dtype(dtype: torch.dtype | str | None, config: Phi3Config) -> torch.dtype:
    if dtype is None:
        return DTYPES[config.torch_dtype]
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise WeightFormatError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype not in DTYPES:
        raise WeightFormatError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def empty_model(config: Phi3Config, dtype: torch.dtype, device: str | torch.device = "cpu") -> Phi3ForCausalLM:
    """The model with uninitialised storage (built on meta, then materialised once)."""
    with torch.device("meta"):
        model = model_class(config)(config).to(dtype)  # the dtype is set on meta: storage is allocated once
    model = model.to_empty(device=device)
    # non-persistent RoPE tables were lost on meta: rebuild them in fp32
    model.rotary_emb = type(model.rotary_emb)(config).to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def init_weights(model: Phi3ForCausalLM, seed: int = 0) -> Phi3ForCausalLM:
    """Random initialisation as the reference does it: N(0, initializer_range) for Linear and Embedding, ones
    for the norms. Seeded, so the same preset and seed always give the same weights."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):  # LayerNorm and projection biases (phi-3.5-MoE) start at zero
                p.zero_()
            elif p.device.type == "cpu":
                p.normal_(0.0, std, generator=g)  # in the parameter's own dtype: no fp32 copy of a bf16 model
            else:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device))
    return model


def load_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu", config: Phi3Config | None = None,
                    quantize: str | None = None) -> Phi3ForCausalLM:
    """Load an official-layout checkpoint folder (or a `.safetensors` file with `config.json` beside it).

    With `quantize` (a `pocketlm quantize` scheme: q4_k, q8_0, q4_0, ...), each weight matrix is quantized as it
    is read (`_fill_quantized`), so memory holds the quantized model plus one float tensor, never the float model.
    The compute dtype of a quantized model is then float32 unless `dtype` says otherwise, as for every quantized
    file pocketlm loads (the checkpoint's own dtype only said how the float weights were stored).
    """
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise WeightFormatError(f"{path}: no such checkpoint folder")
    if config is None:
        config = Phi3Config.from_json_file(folder / "config.json")
        config = config.replace(chat_format=chat_format_of(folder, default=config.chat_format))
    dtype = resolve_dtype("float32" if dtype is None and quantize is not None else dtype, config)
    model = _read_checkpoint(path, config, dtype, device, quantize)
    model.declared_repetition_penalty = declared_repetition_penalty_of(folder)
    return model


def _read_checkpoint(path: Path, config: Phi3Config, dtype: torch.dtype, device, quantize: str | None):
    with CheckpointReader(path) as reader:
        expected = check_files_match(config, reader, path)  # before the model is allocated
        for n in expected:
            if not reader.dtype(n).is_floating_point:
                raise WeightFormatError(f"{path}: tensor {n} has dtype {reader.dtype(n)}; weights must be "
                                        "float32, float16 or bfloat16")
        if quantize is not None:
            return _fill_quantized(config, reader, expected, dtype, device, quantize)
        model = empty_model(config, dtype, device)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in expected:
                params[n].copy_(reader.get(n))  # one tensor in memory at a time; copy_ converts the dtype
    return model


def _fill_quantized(config: Phi3Config, reader: CheckpointReader, expected: dict[str, tuple], dtype: torch.dtype,
                    device: str | torch.device, scheme: str) -> Phi3ForCausalLM:
    """Build the model on the meta device, then read the checkpoint one tensor at a time and put each in place:
    weight matrices quantized by the rule `pocketlm quantize` uses (`linear.tensor_type`, so the same codes as
    `quantize_model` after a float load), norms as float parameters. A weight matrix is read and quantized a slice
    at a time (`_quantize_rows`), so no whole float matrix is ever held. The compute path is "auto" (the CPU kernels where they run the type)."""
    from pocketlm.quant.linear import (FLOAT_TYPES, QuantizedLinear, converted_linear, install_embedding,
                                       set_module, tensor_type)
    with torch.device("meta"):
        model = model_class(config)(config).to(dtype)
    tied = config.tie_word_embeddings
    with torch.no_grad():
        for name in expected:
            module_name = name.rpartition(".")[0]
            shape = tuple(reader.shape(name))
            t = tensor_type(scheme, name, shape)
            if len(shape) == 2 and t not in FLOAT_TYPES:
                cols = shape[1]
                q = _quantize_rows(reader, name, t).to(device)
                if name == "model.embed_tokens.weight":
                    install_embedding(model, None, t, dtype, "auto", tied=tied, raw=q)
                else:
                    set_module(model, module_name, QuantizedLinear(q, t, cols, dtype=dtype, backend="auto"))
                del q
                _release_freed_memory()
                continue
            w = reader.get(name)
            if name == "model.embed_tokens.weight":
                install_embedding(model, w.to(device), t, dtype, "auto", tied=tied)
            elif w.ndim == 2:
                set_module(model, module_name, converted_linear(w.to(device), t, dtype, "auto"))
            else:  # norms and biases: plain float parameters in the model's dtype, under their own name
                setattr(model.get_submodule(module_name), name.rpartition(".")[2],
                        torch.nn.Parameter(w.to(device, dtype)))
            del w
    model.rotary_emb = type(model.rotary_emb)(config).to(device)  # non-persistent tables, lost on meta
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors not filled from the checkpoint: {left}"
    return model.eval()


def _quantize_rows(reader: CheckpointReader, name: str, type_name: str) -> torch.Tensor:
    """The GGUF bytes of 2-D tensor `name` quantized to `type_name`, read `linear.QUANT_CHUNK` values at a time.

    Each slice is read from a fresh mapping of the file that is closed before the next, so the float pages never
    pile up in memory: only the quantized bytes grow. Blocks never span rows, so the bytes equal quantizing the
    whole tensor at once."""
    from safetensors import SafetensorError, safe_open

    from pocketlm.quant import codecs
    from pocketlm.quant.linear import QUANT_CHUNK, quantize_tensor
    rows, cols = reader.shape(name)
    block, size = codecs.BLOCK[type_name]
    out = torch.empty(rows, cols // block * size, dtype=torch.uint8)
    step = max(1, QUANT_CHUNK // max(cols, 1))
    file = reader.file_of(name)
    for r in range(0, rows, step):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                part = f.get_slice(name)[r:r + step]
        except (SafetensorError, OSError) as e:
            raise WeightFormatError(f"{file}: cannot read tensor {name!r}: {e}") from None
        if tuple(part.shape) != (min(step, rows - r), cols):  # the file changed under us
            raise WeightFormatError(f"{file}: tensor {name!r} rows {r}.. read as {tuple(part.shape)}, the header "
                                    f"said ({rows}, {cols})")
        out[r:r + step] = quantize_tensor(part, type_name)
        del part
        _release_freed_memory()  # the slice's float32 temporaries, before the next slice allocates its own
    return out


def _release_freed_memory() -> None:
    """Hand memory that was freed back to the system (glibc keeps freed heap pages otherwise, and the quantizer's
    temporaries would then add up across tensors); a no-op where the C library has no `malloc_trim`."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util
        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def check_files_match(config: Phi3Config, reader: CheckpointReader, where: str | os.PathLike) -> dict[str, tuple]:
    """Check a config against the tensors the safetensors headers declare, before anything is allocated: the
    layers present must be exactly 0..num_hidden_layers-1, `embed_tokens` must be (vocab_size, hidden_size), and
    every tensor of `expected_shapes(config)` must be there with its shape (so the parameter count the config
    implies never exceeds what the files hold). The config's own sizes are bounded by `Phi3Config`, so building
    the expected-name table is cheap. Raises one WeightFormatError naming the mismatched config keys and values.

    Returns: `expected_shapes(config)`.
    """
    names = set(reader.keys())
    facts = []
    layers = set()
    for n in names:
        parts = n.split(".")
        if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            layers.add(int(parts[2]))
    if layers != set(range(config.num_hidden_layers)):
        facts.append(f"num_hidden_layers = {config.num_hidden_layers}, but the files hold layers "
                     f"{index_spans(layers)}")
    emb = "model.embed_tokens.weight"
    if emb in names and tuple(reader.shape(emb)) != (config.vocab_size, config.hidden_size):
        facts.append(f"vocab_size = {config.vocab_size} and hidden_size = {config.hidden_size}, but {emb} has "
                     f"shape {tuple(reader.shape(emb))}")
    expected = expected_shapes(config)
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected))
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some exporters store the tied head too: accepted if identical shape
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_preview(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensors: {_preview(extra)}")
    bad = [f"{n} has shape {tuple(reader.shape(n))}, expected {s}"
           for n, s in expected.items() if n in names and tuple(reader.shape(n)) != s]
    problems += bad[:8]
    if facts or problems:
        implied = config.num_parameters()
        held = sum(math.prod(reader.shape(n)) for n in names)
        if implied > held:
            facts.append(f"the config implies {implied:,} parameters, the files hold {held:,}")
        raise WeightFormatError(f"{where}: checkpoint does not match config.json "
                                f"({config.num_hidden_layers} layers, hidden {config.hidden_size}): "
                                + "; ".join(facts + problems))
    return expected


def save_checkpoint(model: Phi3ForCausalLM, folder: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> Path:
    """Write `config.json`, `generation_config.json` and the safetensors file(s) in the official layout; with a
    tokenizer, its files too. A phi-3.5-vision model is written by `pocketlm.vision.save` (both halves)."""
    if hasattr(model, "vision_config"):  # Phi3VForCausalLM: the image tower and projector are part of the model
        from pocketlm import vision
        return vision.save(model, folder, dtype=dtype, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    target = resolve_dtype(dtype, config) if dtype is not None else next(model.parameters()).dtype
    dtype_name = {v: k for k, v in DTYPES.items()}[target]
    config.replace(torch_dtype=dtype_name).save_json(folder / "config.json")
    gen = generation_config(config, getattr(model, "declared_repetition_penalty", None), tokenizer)
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    params = dict(model.named_parameters())
    tensors = ((n, params[n].detach().to("cpu", target)) for n in expected_shapes(config))
    write_checkpoint(folder, tensors, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    if tokenizer is not None:
        from pocketlm.chat import template_text
        # the official template text, as tokenizer_config.json files carry it (real newlines), so that other
        # tools render the same prompts; pocketlm itself only recognises it (chat_format_of)
        tokenizer.save_pretrained(folder, chat_template=template_text(config.chat_format))
    return folder


def chat_format_of(folder: Path, *, default: str) -> str:
    """The chat format whose official template a checkpoint's tokenizer_config.json carries (exact match);
    `default` when there is none, with a warning when the template is unknown."""
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return default
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return default  # the tokenizer loader reports a broken tokenizer_config.json with its own error
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict)
                         and t.get("name") == "default"), None)
    if template is None:
        return default
    from pocketlm.chat import format_for_template
    name = format_for_template(template)
    if name is None:
        warnings.warn(f"{path}: chat_template is not one of the official Phi-3 templates; using the "
                      f"{default!r} format (pass --chat-format to choose)", stacklevel=2)
        return default
    return name


def _preview(names: list[str], n: int = 6) -> str:
    head = ", ".join(names[:n])
    return head + (f", ... (+{len(names) - n} more)" if len(names) > n else "")
