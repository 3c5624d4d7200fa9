"""Serve a model over an OpenAI-compatible HTTP API with a web chat page (continuous batching).

  pocketlm serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-slots 8] [--max-queue 64]
                       [--context-length N] [--name NAME] [--device cpu|cuda] [--dtype ...]
                       [--allowed-host NAME ...] [--header-timeout 10] [--body-timeout 60]
                       [--keep-alive-timeout 5] [--max-connections N]

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, and the chat page at /.
Binds to 127.0.0.1 unless --host says otherwise. LongRoPE models serve with one factor set, fixed from
--context-length (long iff it exceeds original_max_position_embeddings).

Browser safety: only requests whose Host header is localhost, a loopback address or the bound address are
answered (403 otherwise: a DNS-rebinding web page cannot reach the API); --allowed-host adds names. POST bodies
must be `Content-Type: application/json` (415 otherwise). Slow clients get 408 and connections past
--max-connections get 503 (app.py, GuardedH11Protocol).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from pocketlm.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register `pocketlm serve` options on its subparser."""
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="checkpoint folder, .safetensors/.gguf file, or preset name (default: the built-in model)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weight dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    from pocketlm.cli import add_quantize_argument
    add_quantize_argument(p)
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer folder or .gguf (default: the model's own, else the bundled Phi-3 tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None, help="model id clients send (default: the MODEL argument's name)")
    p.add_argument("--api-key", default=os.environ.get("POCKETLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $POCKETLM_API_KEY)")
    p.add_argument("--max-slots", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond those; then 429 (default 64)")
    p.add_argument("--max-n", type=int, default=8, help="most choices (n x prompts) per request (default 8)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB; then 413 (default 4)")
    p.add_argument("--context-length", "--num-ctx", type=int, default=None,
                   help="prompt + max_tokens limit, the KV cache's capacity per slot (default: the model's "
                        "max_position_embeddings)")
    from pocketlm.cli import add_kv_cache_argument
    add_kv_cache_argument(p)
    p.add_argument("--chat-format", default=None, help="chat format name (default: the model's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is fastest for tiny models on shared cores)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*.example.com' for its "
                        "subdomains; '*' turns the Host check off). By default only localhost, loopback "
                        "addresses and the --host address are answered (and any IP address when --host is 0.0.0.0 "
                        "or ::), so a web page cannot reach the server through DNS rebinding; others get 403")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a request's headers; then 408 and the connection closes "
                        "(default 10)")
    p.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                   help="seconds a client has to send a request's body after its headers; then 408 (default 60)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                   help="seconds an idle kept-alive connection stays open (default 5)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="open connections served at once; a connection beyond them gets 503 with Retry-After "
                        "(default 256, or half the open-file limit `ulimit -n` when that is lower)")
    p.add_argument("--image-dir", default=None, metavar="DIR",
                   help="vision models: also accept local image paths in image_url parts, inside DIR only (default: "
                        "data: URLs only; URLs are never fetched)")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="prompt tokens prefilled per scheduler step, between decode steps, so a long prompt does "
                        "not stall the other streams (default 512)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the keys/values of prompt prefixes shared by requests (system prompts, resent "
                        "conversations, n > 1) (default on)")
    p.add_argument("--prefix-cache-tokens", type=int, default=None, metavar="N",
                   help="positions the prefix cache keeps, least recently used evicted (default 8192, fewer where "
                        "their keys/values would pass 512 MiB; 0 turns the cache off)")
    p.add_argument("--kv-pool-tokens", type=int, default=None, metavar="N",
                   help="KV positions (prompt + max_tokens per sequence) admitted requests may reserve; a request "
                        "beyond gets 429 with Retry-After (default: no limit beyond the slots; >= the context)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _model_name(spec: str) -> str:
    p = Path(spec)
    if p.exists():
        return (p if p.is_dir() else p.with_suffix("")).name
    return spec


def run(args) -> int:
    """Serve MODEL over an OpenAI-compatible HTTP API with a web chat page, until interrupted."""
    import torch
    import uvicorn

    from pocketlm.api import load
    from pocketlm.serve.app import HostPolicy, ServerConfig, create_app, uvicorn_options

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    for name, lo in (("--max-slots", 1), ("--max-queue", 0), ("--max-n", 1), ("--port", 0), ("--prefill-chunk", 1),
                     ("--prefix-cache-tokens", 0)):
        v = getattr(args, name[2:].replace("-", "_"))
        if v is not None and v < lo:
            raise ConfigError(f"{name} {v} must be >= {lo}")
    if not 0 < args.max_body_mb <= 1024:
        raise ConfigError(f"--max-body-mb {args.max_body_mb} must be in (0, 1024]")
    for name in ("--header-timeout", "--body-timeout", "--keep-alive-timeout"):
        v = getattr(args, name[2:].replace("-", "_"))
        if not 0 < v <= 3600:
            raise ConfigError(f"{name} {v} must be in (0, 3600] seconds")
    if args.max_connections is not None and args.max_connections < 1:
        raise ConfigError(f"--max-connections {args.max_connections} must be >= 1")
    hosts = HostPolicy(args.allowed_host, args.host)  # a bad --allowed-host fails before the model loads
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.api_key:
        print(f"pocketlm serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the model", file=sys.stderr)
    if hosts.any:
        print("pocketlm serve: warning: --allowed-host '*' turns the Host check off: a web page can reach this "
              "server through DNS rebinding", file=sys.stderr)
    from pocketlm.cli import _use_default_model
    _use_default_model(args)  # MODEL omitted: the embedded default model, as `run` loads it
    model = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    from pocketlm.cli import apply_kv_cache
    apply_kv_cache(model, args.kv_cache, what=args.model, fast=False)  # slots, prefills and the prefix cache
    from pocketlm.cli import _tokenizer_for
    tok = _tokenizer_for(args, model)  # as `run` finds it: --tokenizer, the GGUF's vocabulary, the folder's files
    if args.context_length is not None and not 0 < args.context_length <= model.config.max_position_embeddings:
        raise ConfigError(f"--context-length {args.context_length} is outside [1, "
                          f"{model.config.max_position_embeddings}]")
    config = ServerConfig(model_name=args.name or _model_name(args.model), api_key=args.api_key,
                          max_slots=args.max_slots, max_queue=args.max_queue, max_n=args.max_n,
                          max_body_bytes=int(args.max_body_mb * 2**20), context_length=args.context_length,
                          chat_format=args.chat_format, allowed_hosts=list(args.allowed_host), bind_host=args.host,
                          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections,
                          modelfile=getattr(args, "modelfile", None), prefill_chunk=args.prefill_chunk,
                          prefix_cache=args.prefix_cache, prefix_cache_tokens=args.prefix_cache_tokens,
                          kv_pool_tokens=args.kv_pool_tokens, image_dir=args.image_dir)
    # no autograd while serving (the engine's thread sets its own mode); scoped, so the caller's grad mode
    # survives `run` (the CLI tests call it in-process)
    with torch.no_grad():
        app = create_app(model, tok, config)
        print(f"pocketlm serve: {config.model_name} on http://{args.host}:{args.port} (chat page at /, API at "
              f"/v1; {args.max_slots} slots, context "
              f"{config.context_length or model.config.max_position_embeddings}"
              + (f", LongRoPE policy {app.state.longrope_policy}" if app.state.longrope_policy else "") + ")",
              file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                    **uvicorn_options(config))
    return 0
