"""`pocketlm <verb>`: the only entry point. Each verb is one plain function over parsed arguments.

MODEL, wherever it appears, is a checkpoint folder (official Hugging Face layout), a weight file
(`.safetensors` with `config.json` beside it, or `.gguf`), or a preset name (a randomly initialised model with
that exact structure, see `pocketlm info --presets`), or the name of a model in the store (`pocketlm pull phi3:mini`,
`pocketlm list`; see pocketlm/store/).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from pocketlm.errors import PocketLMError, TokenizerError


# ---- shared helpers ---------------------------------------------------------------------------------------------

def _add_model(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    if optional:  # run / chat: without MODEL, the embedded default model (pocketlm.api.default_model_path)
        p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                       help="checkpoint folder, .safetensors/.gguf file, or preset name (default: the built-in model)")
    else:
        p.add_argument("model", metavar="MODEL", help="checkpoint folder, .safetensors/.gguf file, or preset name")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weight dtype (default: the checkpoint's)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer folder or .gguf (default: the model's own, else the bundled Phi-3 tokenizer)")
    if optional:  # run / chat
        add_quantize_argument(p)


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    """--quantize SCHEME: quantize float weights while loading (run, chat and serve)."""
    from pocketlm.api import QUANTIZE_SCHEMES
    p.add_argument("--quantize", choices=QUANTIZE_SCHEMES, default=None, metavar="SCHEME",
                   help=f"quantize float weights while loading, tensor by tensor, to run on the CPU kernels: "
                        f"{', '.join(QUANTIZE_SCHEMES)} (default: keep the weights as stored)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 discourages repeats, 1.0 = off (default: the one the model file declares, else off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--chat-format", default=None, help="chat format name (default: the model's)")
    add_kv_cache_argument(g)
    g.add_argument("--num-ctx", type=int, default=None, metavar="N",
                   help="context window: prompt + reply fit in N tokens, the KV cache's capacity (default: the "
                        "model's max_position_embeddings, or the Modelfile's num_ctx)")


def add_kv_cache_argument(p) -> None:
    """--kv-cache TYPE (run, chat and serve): how keys and values are stored (pocketlm.kvcache)."""
    from pocketlm.kvcache import KV_CACHE_TYPES
    p.add_argument("--kv-cache", choices=KV_CACHE_TYPES, default=None, metavar="TYPE",
                   help="KV cache type: f32, f16, int8 (per-row scale), q8_0 or q4_0 (ggml blocks of 32 with f16 "
                        "scales: 0.53x and 0.28x the f16 memory); default: f16 on the CPU kernels, else the "
                        "weights' dtype. `pocketlm info MODEL --ctx N` prints the memory of each")


def apply_kv_cache(model, kv_type: str | None, *, what: str = "MODEL", fast: bool = True) -> None:
    """Make `model` store keys/values as `kv_type`: the C decoder's cache for a model on the CPU kernels (when
    `fast`), else the PyTorch KVCache's (`model.kv_cache_type`)."""
    if kv_type is None:
        return
    from pocketlm.engine import cpu
    from pocketlm.kvcache import check_head_dim, check_kv_type
    check_kv_type(kv_type)
    check_head_dim(kv_type, model.config.head_dim)
    if fast and cpu.eligible(model):
        if kv_type not in cpu.KV_DTYPES:
            raise PocketLMError(f"--kv-cache {kv_type}: {what} runs on the CPU kernels, whose decode step stores "
                                f"{', '.join(cpu.KV_DTYPES)}")
        cpu.accelerate(model, kv_type)  # the decode loop picks this decoder up
    else:
        model.kv_cache_type = kv_type


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _use_default_model(args) -> None:
    """MODEL omitted (run, chat, serve): the embedded default model. Stored as a quantized GGUF it runs on the CPU
    kernels as it is; stored as float weights it is quantized to Q8_0 while loading so that it does (measured on
    the float `small-cpu` default: the same greedy replies as float32, 2.5x its decode tokens/s, a quarter of its
    load time; served, 16x one stream's tokens/s), unless --quantize, --dtype or a --device other than the CPU
    says otherwise (--dtype alone: that float dtype, unquantized)."""
    if args.model is None:
        from pocketlm.api import DEFAULT_MODEL_NAME, default_model_path, gguf_checkpoint_dtype, gguf_folder_file
        folder = default_model_path()
        args.model = str(folder)
        args.store_name = getattr(args, "store_name", None) or DEFAULT_MODEL_NAME  # the name chat shows
        gguf = gguf_folder_file(folder)
        stored_quantized = gguf is not None and gguf_checkpoint_dtype(gguf)[1]
        if args.dtype is None and hasattr(args, "quantize") and args.quantize is None and \
                getattr(args, "device", "cpu") == "cpu" and not stored_quantized:
            args.quantize = "q8_0"
        if args.dtype is None:
            args.dtype = "float32"


def _load(args):
    from pocketlm.api import load
    _use_default_model(args)
    model = load(args.model, dtype=args.dtype, quantize=getattr(args, "quantize", None))
    apply_kv_cache(model, getattr(args, "kv_cache", None), what=args.model)
    if getattr(args, "num_ctx", None) is not None and not 0 < args.num_ctx <= model.config.max_position_embeddings:
        raise PocketLMError(f"--num-ctx {args.num_ctx} is outside [1, max_position_embeddings="
                            f"{model.config.max_position_embeddings}]")
    return model


def _tokenizer_for(args, model):
    from pocketlm.tokenizer import Tokenizer
    if getattr(model.config, "model_type", "phi3") == "phi3small":  # cl100k_base + its specials (tokenizer_small)
        from pocketlm.tokenizer_small import Phi3SmallTokenizer
        return _check_vocab(Phi3SmallTokenizer.from_pretrained(args.tokenizer or args.model), model)
    source = args.tokenizer
    if source is None:
        from pocketlm.api import gguf_folder_file
        p = gguf_folder_file(args.model) or Path(args.model)  # the default model's folder: its one GGUF file
        folder = p if p.is_dir() else p.parent
        if p.suffix == ".gguf" and p.is_file():
            from pocketlm.formats.gguf import GGUFFile
            with GGUFFile(p) as g:
                has_vocab = "tokenizer.ggml.tokens" in g.metadata
            if has_vocab:
                tok = Tokenizer.from_pretrained(p)  # llama and gpt2 vocabularies
                return _check_vocab(tok, model)
        elif p.exists() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
            source = folder
    tok = Tokenizer.from_pretrained(source) if source is not None else Tokenizer.default()
    return _check_vocab(tok, model)


def _check_vocab(tok, model):
    if len(tok) > model.config.vocab_size:
        raise TokenizerError(f"the tokenizer defines {len(tok)} ids but the model has only "
                             f"{model.config.vocab_size} embedding rows")
    return tok


def _chat_format(args, model) -> str:
    return args.chat_format or model.config.chat_format


def _print_stats(result, file=None) -> None:
    file = file if file is not None else sys.stderr  # looked up at call time (tests swap sys.stderr)
    # the figures `ollama run --verbose` prints
    print(f"\nprompt eval count:    {result.prompt_tokens} token(s)\n"
          f"prompt eval duration: {result.prompt_seconds * 1000:.1f} ms\n"
          f"prompt eval rate:     {result.prompt_tokens_per_s:.2f} tokens/s\n"
          f"eval count:           {result.completion_tokens} token(s)\n"
          f"eval duration:        {result.decode_seconds * 1000:.1f} ms\n"
          f"eval rate:            {result.decode_tokens_per_s:.2f} tokens/s\n"
          f"finish reason:        {result.finish_reason}", file=file)


def _print_paths(model, file=None) -> None:
    """Which compute path each weight type runs on (kernels, int4, reference, pytorch), so a slow path is never
    silent."""
    from pocketlm.quant import kernels
    from pocketlm.quant.linear import linear_paths
    file = file if file is not None else sys.stderr
    names = {"kernel": f"kernels ({kernels.isa()})", "reference": "reference (dequantize per call)"}
    parts = [f"{t} x{n} {names.get(path, path)}" for t, paths in linear_paths(model).items()
             for path, n in paths.items()]
    print("weights:              " + ", ".join(parts), file=file)


def _stream_to_stdout(model, tok, prompt, args):
    from pocketlm.engine.generate import GenerationResult, stream_events
    result = None
    for event in stream_events(model, tok, prompt, chat_format=_chat_format(args, model),
                               response_format=_json_schema_format(getattr(args, "json_schema", None)),
                               **_sampling(args)):
        if isinstance(event, GenerationResult):
            result = event
        else:
            sys.stdout.write(event)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return result


def _json_schema_format(path) -> dict | None:
    """`--json-schema FILE` -> an OpenAI-style response_format (the reply is JSON valid for that schema)."""
    if path is None:
        return None
    import json
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PocketLMError(f"--json-schema {path}: cannot read a JSON schema: {e}") from None
    from pocketlm.serve.grammar import check_schema
    check_schema(schema)  # SchemaError names the unsupported keyword
    return {"type": "json_schema", "schema": schema}


# ---- verbs --------------------------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    """Generate a reply to one prompt (chat format unless --raw) and print it as it is produced."""
    model = _load(args)
    tok = _tokenizer_for(args, model)
    prompt = args.prompt if args.raw else [{"role": "system", "content": args.system}] * bool(args.system) + [
        {"role": "user", "content": args.prompt}]
    if args.image:  # phi-3.5-vision: the images go in front of the prompt as <|image_1|> ..
        from pocketlm.vision import run_with_images
        return run_with_images(model, tok, prompt, args, _chat_format(args, model), _sampling(args), _print_stats)
    _fit_num_ctx(args, tok, prompt, model)
    result = _stream_to_stdout(model, tok, prompt, args)
    if args.verbose:
        _print_stats(result)
        _print_paths(model)
        _print_declared_sampling(args, model)
    return 0


def _print_declared_sampling(args, model, file=None) -> None:
    """The repetition penalty the model file declares, when it was applied (no --repetition-penalty given)."""
    from pocketlm.engine.sampling import model_repetition_penalty
    penalty = model_repetition_penalty(model)
    if args.repetition_penalty is None and penalty != 1.0:
        print(f"repetition penalty:   {penalty:g} (the model file's default; --repetition-penalty 1 turns it off)",
              file=file if file is not None else sys.stderr)


def cmd_chat(args) -> int:
    """Interactive chat as in `ollama run`: triple quotes for multi-line, /set system, /set parameter, /show, /save,
    /load, /clear, /bye (or Ctrl-D); Ctrl-C stops a reply. /? lists the commands."""
    from pocketlm.chat_repl import ChatREPL
    model = _load(args)
    tok = _tokenizer_for(args, model)
    return ChatREPL(model, tok, args).run()


def _fit_num_ctx(args, tok, prompt, model) -> None:
    """A Modelfile's num_ctx: the prompt and the reply must fit in num_ctx tokens (max_tokens is cut to fit)."""
    num_ctx = getattr(args, "num_ctx", None)
    if not num_ctx:
        return
    from pocketlm.engine.generate import encode_prompt
    from pocketlm.errors import GenerationError
    n = len(encode_prompt(tok, prompt, chat_format=None if args.raw else _chat_format(args, model))[0])
    if n >= num_ctx:
        raise GenerationError(f"the prompt takes {n} tokens but the model's num_ctx is {num_ctx}")
    args.max_tokens = min(args.max_tokens, num_ctx - n)


def _describe(config, *, source: str, file_info: dict | None = None) -> dict:
    n = config.num_parameters()
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    rs = config.rope_scaling
    info = {
        "model": source,
        "architecture": config.to_hf_dict()["architectures"][0],
        "parameters": n,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "rope": (f"LongRoPE (theta {config.rope_theta:g}, switch above {config.original_max_position_embeddings}, "
                 f"magnitude {config.rope_attention_factor:.6f}, policy {config.longrope_policy})" if rs else
                 f"RoPE (theta {config.rope_theta:g})"),
        "sliding_window": (f"{config.sliding_window} ({config.attention_window} visible keys)"
                           if config.sliding_window is not None else None),
        "tied_embeddings": config.tie_word_embeddings,
        "chat_format": config.chat_format,
        "weights_bytes": {"float32": 4 * n, "bfloat16": 2 * n},
        "kv_cache_bytes_per_token_bf16": 2 * kv_per_token,
        "kv_cache_bytes_full_context_bf16": 2 * kv_per_token * config.max_position_embeddings,
    }
    if getattr(config, "model_type", "phi3") == "phi3small":
        dense = sum(config.is_dense_layer(i) for i in range(config.num_hidden_layers))
        info["attention"] = (f"{config.num_hidden_layers - dense} block-sparse layers (blocks of "
                             f"{config.blocksparse_block_size}, {config.blocksparse_num_local_blocks} local, vertical "
                             f"stride {config.blocksparse_vert_stride}, "
                             f"{'one pattern' if config.blocksparse_homo_head_pattern else 'per-head patterns'}), "
                             f"{dense} dense; GEGELU (limit {config.gegelu_limit}); muP (embedding x"
                             f"{config.mup_embedding_multiplier}, logits / {config.mup_width_multiplier}, scale "
                             f"{config.mup_attn_multiplier}/head_dim)")
    if rs is not None and (rs.short_mscale is not None or rs.long_mscale is not None):  # per-mode magnitudes
        default = f"{config.rope_attention_factor:.6f}"
        short, long = (default if m is None else f"{m:.6f}" for m in (rs.short_mscale, rs.long_mscale))
        info["rope"] = info["rope"].replace(f"magnitude {default}", f"magnitude short {short} / long {long}")
    if getattr(config, "is_moe", False):  # phi-3.5-MoE: what one token uses (2 of the experts per layer)
        active = config.num_parameters(active=True)
        info["experts"] = (f"{config.num_local_experts} per layer, {config.num_experts_per_tok} active per token "
                           f"(SparseMixer routing, jitter eps {config.router_jitter_noise:g})")
        info["active_parameters"] = active
        info["active_weights_bytes"] = {"float32": 4 * active, "bfloat16": 2 * active}
    if file_info:
        info.update(file_info)
    return info


def _gib(x: int) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def cmd_info(args) -> int:
    """Architecture, parameter count and memory of a model, without loading its weights."""
    from pocketlm.config import PRESETS, Phi3Config, preset
    if args.presets:
        for name in PRESETS:
            c = preset(name)
            print(f"{name:20s} {c.num_parameters() / 1e9:7.3f}B  layers {c.num_hidden_layers:2d}  hidden "
                  f"{c.hidden_size:5d}  heads {c.num_attention_heads}/{c.num_key_value_heads}  context "
                  f"{c.max_position_embeddings}")
        from pocketlm import vision
        for name in vision.VISION_PRESETS:  # the language model's shape; the count includes the image tower
            d, c = vision.describe(name), vision.vision_preset(name).text
            print(f"{name:20s} {d['parameters'] / 1e9:7.3f}B  layers {c.num_hidden_layers:2d}  hidden "
                  f"{c.hidden_size:5d}  heads {c.num_attention_heads}/{c.num_key_value_heads}  context "
                  f"{c.max_position_embeddings}  + image tower")
        return 0
    if args.model is None:
        from pocketlm.api import default_model_path
        args.model = str(default_model_path())
    from pocketlm import vision
    if vision.is_vision_model(args.model):  # phi-3.5-vision: both halves
        info = vision.describe(args.model)
        print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k:19s}{v:,}" if isinstance(v, int)
                                                                 else f"{k:19s}{v}" for k, v in info.items()))
        return 0
    path = Path(args.model)
    file_info = None
    if path.exists() and path.suffix == ".gguf":
        from pocketlm.formats.gguf_model import gguf_config
        config, file_info = gguf_config(path)
    elif path.exists():
        folder = path if path.is_dir() else path.parent
        config = Phi3Config.from_json_file(folder / "config.json")
        from pocketlm.formats.safetensors_io import CheckpointReader
        with CheckpointReader(path) as r:
            dtypes = sorted({str(r.dtype(k)).replace("torch.", "") for k in r.keys()})
            file_info = {"files": [str(f) for f in r.files], "file_bytes": r.total_bytes, "file_dtypes": dtypes}
    elif args.model in PRESETS:
        config = preset(args.model)
    else:
        raise PocketLMError(f"{args.model!r} is neither an existing path nor a preset; presets: {sorted(PRESETS)}")
    info = _describe(config, source=args.model, file_info=file_info)
    if args.ctx is not None:
        from pocketlm.kvcache import memory_plan
        if file_info and "file_bytes" in file_info:  # the weights as stored (GGUF: quantized; safetensors: its dtype)
            wb, label = file_info["file_bytes"], "as stored in " + ", ".join(file_info.get("file_dtypes", []))
        else:
            wb, label = info["weights_bytes"]["bfloat16"], "bf16"
        info["memory_plan"] = memory_plan(config, args.ctx, wb, label)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model            {info['model']}")
    print(f"architecture     {info['architecture']}")
    print(f"parameters       {info['parameters'] / 1e9:.2f}B ({info['parameters']:,})")
    print(f"layers           {info['layers']}")
    print(f"hidden / ffn     {info['hidden_size']} / {info['intermediate_size']}")
    print(f"heads (q / kv)   {info['attention_heads']} / {info['kv_heads']} x {info['head_dim']}")
    print(f"vocabulary       {info['vocab_size']}")
    print(f"context          {info['context_length']}")
    print(f"position         {info['rope']}")
    print(f"sliding window   {info['sliding_window'] or 'none'}")
    print(f"tied embeddings  {info['tied_embeddings']}")
    print(f"chat format      {info['chat_format']}")
    if "attention" in info:
        print(f"attention        {info['attention']}")
    if "experts" in info:
        print(f"experts          {info['experts']}")
        print(f"active params    {info['active_parameters'] / 1e9:.2f}B ({info['active_parameters']:,}) per token, "
              f"{_gib(info['active_weights_bytes']['bfloat16'])} bf16 read per token")
    print(f"weights          {_gib(info['weights_bytes']['bfloat16'])} bf16, "
          f"{_gib(info['weights_bytes']['float32'])} fp32")
    print(f"KV cache (bf16)  {info['kv_cache_bytes_per_token_bf16'] // 1024} KiB/token, "
          f"{_gib(info['kv_cache_bytes_full_context_bf16'])} at {info['context_length']} tokens")
    if file_info and "file_bytes" in file_info:
        print(f"files            {len(file_info['files'])} ({_gib(file_info['file_bytes'])}, "
              f"{', '.join(file_info['file_dtypes'])})")
    if "memory_plan" in info:
        plan = info["memory_plan"]
        print(f"memory plan at {plan['ctx']} tokens (batch 1; weights {_gib(plan['weights_bytes'])} {plan['weights']}; "
              "runtime overhead not included):")
        print(f"  {'--kv-cache':10s} {'KV cache':>12s} {'total':>12s}")
        for t, b in plan["kv_cache_bytes"].items():
            print(f"  {t:10s} {_gib(b):>12s} {_gib(plan['total_bytes'][t]):>12s}")
    return 0


def cmd_convert(args) -> int:
    """Write MODEL (preset, folder, .safetensors or .gguf) as an official-layout checkpoint folder."""
    from pocketlm.formats.hf import save_checkpoint
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise PocketLMError(f"{out} exists and is not empty; pass --force to write into it")
    t = time.perf_counter()
    from pocketlm.api import load_for_conversion  # a quantized GGUF is dequantized; loaded before any write
    model, dtype = load_for_conversion(args.model, dtype=args.dtype)
    tok = _tokenizer_for(args, model)
    size = model.config.num_parameters() * {"float32": 4}.get(dtype, 2)
    print(f"writing {out} ({dtype}, {size / 1e9:.2f} GB) ...", file=sys.stderr, flush=True)
    save_checkpoint(model, out, dtype=dtype, max_shard_bytes=_parse_size(args.max_shard_size),
                    tokenizer=tok)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out} ({', '.join(files)}) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return 0


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper()
    num = s.rstrip("KMGIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise PocketLMError(f"--max-shard-size {text!r} is not a size like 2GB, 500MB or 1GiB") from None
    if value < 1:
        raise PocketLMError(f"--max-shard-size {text!r} must be positive")
    return int(value)


# ---- the table ------------------------------------------------------------------------------------------------------

COMMANDS = {
    "run": cmd_run,
    "chat": cmd_chat,
    "info": cmd_info,
    "convert": cmd_convert,
}
# Verbs whose arguments and function live with their stage: module.add_arguments(parser), module.run(args) -> int.
STAGE_COMMANDS = {
    "serve": "pocketlm.serve.commands",
    "eval": "pocketlm.eval.commands",
    "train": "pocketlm.train.commands",
    "quantize": "pocketlm.quant.commands",
    "data": "pocketlm.data.commands",
    "recipe": "pocketlm.recipe.commands",
    "distill": "pocketlm.train.distill_commands",
}


def _unavailable(verb: str, error: ImportError):
    def run(args) -> int:
        raise PocketLMError(f"'pocketlm {verb}' cannot start: {error} (install the project with its extras: "
                            "`pip install -e .[all]`)")
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pocketlm", description="Phi-3 models, end to end, on your machine.")
    parser.add_argument("--version", action="version", version=f"pocketlm {__import__('pocketlm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help=cmd_run.__doc__, description=cmd_run.__doc__)
    _add_model(p, optional=True)
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--raw", action="store_true", help="plain text completion, no chat format")
    p.add_argument("--system", default=None, help="system message (chat format only)")
    p.add_argument("--verbose", "-v", action="store_true", help="print prompt and decode tokens/s")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the reply to JSON valid for the JSON schema in FILE")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for a vision model (phi-3.5-vision); repeatable")
    _add_sampling(p)

    p = sub.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__)
    _add_model(p, optional=True)
    p.add_argument("--system", default=None, help="system message")
    _add_sampling(p)

    p = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="checkpoint folder, weight file or preset name (default: the built-in model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--presets", action="store_true", help="list the presets")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="print the memory plan: weights + KV cache at N tokens for each --kv-cache type")

    p = sub.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    _add_model(p)
    p.add_argument("output", metavar="OUTPUT", help="folder to write")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")

    from pocketlm.store.commands import register as register_store_verbs  # pull, list, show, rm, cp, import, create
    for verb, function in register_store_verbs(sub).items():
        COMMANDS.setdefault(verb, function)

    for verb, module_name in STAGE_COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and e.name is not None and module_name.startswith(e.name):
                continue  # that stage is not built yet
            # a missing optional dependency must not take the other verbs down: the verb reports it when used
            p = sub.add_parser(verb, help=f"(unavailable: {e})", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            COMMANDS.setdefault(verb, _unavailable(verb, e))
            continue
        doc = (module.__doc__ or verb).strip().splitlines()[0]
        module.add_arguments(sub.add_parser(verb, help=doc, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
        COMMANDS.setdefault(verb, module.run)
    assert set(sub.choices) == set(COMMANDS), "COMMANDS and the subparsers must list the same verbs"
    parser.verbs = sub.choices  # the verbs' own parsers (main parses `run` intermixed)
    return parser


# verbs whose MODEL may be a store name; the store entry's Modelfile defaults apply to run, chat and serve
_MODEL_VERBS = ("run", "chat", "serve", "eval", "info", "convert", "quantize")
# Modelfile PARAMETER -> (argument dest, its flag)
_MODELFILE_ARGS = {"temperature": ("temperature", "--temperature"), "top_p": ("top_p", "--top-p"),
                   "top_k": ("top_k", "--top-k"), "min_p": ("min_p", "--min-p"),
                   "repeat_penalty": ("repetition_penalty", "--repetition-penalty"), "seed": ("seed", "--seed"),
                   "num_predict": ("max_tokens", "--max-tokens"), "stop": ("stop", "--stop")}


def _given(argv: list[str], flag: str) -> bool:
    """True when the command line sets `flag` (also as --flag=VALUE or an abbreviation argparse accepts)."""
    for a in argv:
        tok = a.split("=", 1)[0]
        if len(tok) > 3 and tok.startswith("--") and flag.startswith(tok):
            return True
    return False


def resolve_store_model(args, argv: list[str]) -> None:
    """MODEL given as a store name (phi3:mini, a `pocketlm create`d model, ...): point args.model at its weights
    and apply its Modelfile defaults where the command line did not set them. Anything else is left to the
    loader; a name that is not in the store raises ModelNotFoundError with the command that fetches it."""
    spec = getattr(args, "model", None)
    if args.command not in _MODEL_VERBS or spec is None:
        return
    if args.command == "eval" and (getattr(args, "endpoint", None) or spec in ("tasks", "contamination")):
        return
    from pocketlm.store import resolve
    entry = resolve(spec)
    if entry is None:
        return
    args.model = str(entry.weights)
    args.store_name = entry.name
    mf = entry.modelfile
    if args.command == "serve":
        if getattr(args, "name", None) is None:
            args.name = entry.name  # clients send the store name, not the folder's
        args.modelfile = mf  # the server fills what each request leaves out (pocketlm.store.defaults)
    if args.command not in ("run", "chat", "serve"):
        return
    for key, value in (mf.get("parameters") or {}).items():
        dest, flag = _MODELFILE_ARGS.get(key, (None, None))
        if dest is not None and hasattr(args, dest) and not _given(argv, flag):
            setattr(args, dest, list(value) if isinstance(value, list) else value)
    num_ctx = (mf.get("parameters") or {}).get("num_ctx")
    if num_ctx is not None:
        if hasattr(args, "context_length"):  # serve
            if not (_given(argv, "--context-length") or _given(argv, "--num-ctx")):
                args.context_length = num_ctx
        elif not _given(argv, "--num-ctx"):
            args.num_ctx = num_ctx
    if mf.get("system") is not None and hasattr(args, "system") and args.system is None:
        args.system = mf["system"]


def _warn_if_preset(args) -> None:
    """A verb that uses a model's weights, given a preset name: say once that those weights are random."""
    spec = getattr(args, "model", None)
    if args.command in _MODEL_VERBS and args.command != "info" and spec is not None and not Path(spec).exists():
        from pocketlm.config import PRESETS
        from pocketlm.vision import VISION_PRESETS
        if spec in PRESETS or spec in VISION_PRESETS:
            from pocketlm.api import warn_random_weights
            warn_random_weights(spec)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["run"]:
        # `run [MODEL] PROMPT` with options between the two (`run MODEL --image x.png "What is this?"`): plain
        # parsing takes the first positional alone as PROMPT; intermixed parsing reads the options first
        args = parser.verbs["run"].parse_intermixed_args(argv[1:])
        args.command = "run"
    else:
        args = parser.parse_args(argv)
    try:
        if args.command in _MODEL_VERBS and isinstance(getattr(args, "model", None), str):
            # MODEL a folder holding one GGUF file and no config.json: that file
            from pocketlm.api import gguf_folder_file
            args.model = str(gguf_folder_file(args.model) or args.model)
        resolve_store_model(args, argv)
        _warn_if_preset(args)
        return COMMANDS[args.command](args)
    except PocketLMError as e:
        print(f"pocketlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
