"""Serving throughput: aggregate tokens/s at 1, 4, 8, 16 and 32 concurrent requests, against the same requests run
one at a time, through a real `pocketlm serve` process on 127.0.0.1; and the prefix cache's effect on time to
first token when 16 clients share a 500-token system prompt.

For each concurrency level c: c chat requests (distinct prompts, greedy, max_tokens fixed, stop tokens biased
away so every request generates exactly max_tokens) are sent at once as streams, then the same c requests are
sent one after another. The levels run in `--repeats` rounds (default 3), each round every level once in turn,
and the median run of each level (by aggregate tokens/s) is reported: wall time, aggregate tokens/s both ways,
`x c=1` (the issue's measure against one stream: per round, the level's aggregate tokens/s over the c = 1 run of
the same round, seconds apart; the median of those ratios, so a machine whose speed drifts between rounds moves
both sides of each ratio alike), the speedup (the ratio against the sequential baseline measured in the same
run), p50/p99 time to first token of the concurrent run. The client parses only the chunks it needs (the first
content, the usage): it shares the cores with the server. One more baseline row: `pocketlm.engine.generate`
in-process (no HTTP) on the first 4 prompts.

Shared system prompt (`--shared-clients 16`, 0 to skip): two more server processes, one with the prefix cache
and one with `--no-prefix-cache`, each get the same 16 chat requests at once: a ~500-token system message (the
same for all) and a short distinct user message, `--shared-max-tokens` tokens each. Round 1 sends a system prompt
the cache has not seen (the first request to be prefilled fills it); round 2 sends 16 new user messages with the
same system prompt. Both rounds run `--repeats` times, each time with another system prompt; the medians are
reported. Reported: TTFT p50/p99 per round with and without the cache, their ratio (target: p50 with <= 1/3 of
without), and the server's prefix cache hit rate from /metrics.

    python bench/bench_serve.py [--model tiny|default|PATH] [--quantize q8_0] [--max-tokens 64]
                                [--levels 1,4,8,16,32] [--threads 1] [--shared-clients 16] [--out FILE.json]

`--model default` serves the embedded default model (`pocketlm serve` with MODEL omitted). `--quantize SCHEME`
passes `--quantize` to the server (and the in-process baseline): a float model then runs on the CPU kernels,
whose decode steps are one C call per step for the whole batch (engine/cpu_batch.py). The JSON records the
1-minute load average before and after the run (the machine may be shared).

The server runs in its own process (so the client's Python does not share its GIL); prints a table and writes
JSON. On the shared 2-core development machine the numbers move with other load: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

try:  # the HTTP client openai>=3 depends on; older openai releases use httpx, the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

NO_STOP: dict[str, float] = {}  # set by main: every special id of the served model's tokenizer, biased away


def model_tokenizer(model_name: str):
    """The tokenizer `pocketlm serve` uses for --model: the default model's own (its GGUF file's vocabulary), the
    Phi-3 tokenizer for a preset, else the model's."""
    from pocketlm import Tokenizer
    if model_name == "default":  # a folder holding one GGUF file: from_pretrained reads that file's vocabulary
        from pocketlm.api import default_model_path
        return Tokenizer.from_pretrained(default_model_path())
    return Tokenizer.default() if model_name == "tiny" else Tokenizer.from_pretrained(model_name)


def stop_bias(tok) -> dict[str, float]:
    """A logit_bias that keeps every special id (end of turn, end of text) from being picked, so that each reply
    runs to max_tokens whatever the model's vocabulary (Phi-3's 32000/32007, SmolLM2's 0-16)."""
    return {str(i): -100 for i in sorted(tok.special_ids)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SAMPLING: dict = {"temperature": 0}  # set by main (--temperature, --top-p): greedy unless asked


def body(i: int, max_tokens: int) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": f"Request {i}: say something about {i}."}],
            "max_tokens": max_tokens, **SAMPLING, "stream": True, "logit_bias": NO_STOP,
            "stream_options": {"include_usage": True}}


async def one(client: httpx.AsyncClient, url: str, b: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=b) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r:.200}")
        async for line in r.aiter_lines():
            # parse only what the numbers need (the first content, the usage chunk): the client shares the
            # machine's cores with the server, so it does as little per token as it can
            if not line.startswith("data: ") or line == "data: [DONE]" or (ttft is not None and '"usage"' not in line):
                continue
            obj = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in obj.get("choices", [])):
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def run_level(url: str, c: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=c + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        bodies = [body(i, max_tokens) for i in range(c)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*[one(client, url, b) for b in bodies])
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        seq_tokens = 0
        for b in bodies:
            seq_tokens += (await one(client, url, b))[1]
        seq_wall = time.perf_counter() - t1
    ttfts = sorted(r[0] for r in res)
    tokens = sum(r[1] for r in res)
    return {"concurrency": c, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "sequential_wall_s": seq_wall, "sequential_tokens_per_s": seq_tokens / seq_wall,
            "speedup": (tokens / wall) / (seq_tokens / seq_wall),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def shared_system_prompt(n_tokens: int = 500, shop: int = 0) -> str:
    """A system message of about n_tokens tokens (numbered shop rules), measured with the default tokenizer; each
    `shop` number gives another message from its first token (a cold prefix cache for it)."""
    from pocketlm import Tokenizer

    tok = Tokenizer.default()
    topics = ["opening hours", "returns", "warranty", "delivery", "gift cards", "power tools", "paint", "timber",
              "fasteners", "garden supplies", "plumbing", "safety gear"]
    lines, k = [f"Shop {shop} rules."], 0
    while len(tok.encode("\n".join(lines))) < n_tokens:
        lines.append(f"Rule {k + 1}: when a customer asks about {topics[k % len(topics)]}, answer in one short, "
                     f"polite sentence and never guess a price.")
        k += 1
    return "\n".join(lines)


def shared_body(system: str, i: int, max_tokens: int) -> dict:
    return {"model": "bench", "messages": [{"role": "system", "content": system},
                                           {"role": "user", "content": f"Customer {i}: question number {i}?"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "logit_bias": NO_STOP}


async def run_shared(url: str, system: str, clients: int, max_tokens: int, offset: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        res = await asyncio.gather(*[one(client, url, shared_body(system, offset + i, max_tokens))
                                     for i in range(clients)])
    ttfts = sorted(r[0] for r in res)
    return {"ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def prefix_metrics(base: str) -> dict:
    """The prefix cache series of the server's /metrics (empty with --no-prefix-cache)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("pocketlm_prefix_cache_"):
            name, value = line.split()
            out[name[len("pocketlm_prefix_cache_"):]] = float(value)
    return out


class Server:
    """`pocketlm serve` in its own process on a free port; `with Server(cmd_args) as base_url:`."""

    def __init__(self, args: list[str]):
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "pocketlm.cli", "serve", *args, "--name", "bench", "--port", str(self.port),
                    "--log-level", "warning"]

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{self.port}"
        for _ in range(600):  # bounded: 60 s to start
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return base
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        self.__exit__()
        raise SystemExit("the server did not answer /health within 60 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def shared_prompt_scenario(model_args: list[str], common: list[str], clients: int, max_tokens: int,
                           repeats: int = 1) -> dict:
    """TTFT of `clients` concurrent requests sharing a ~500-token system prompt, with and without the prefix
    cache, two rounds each (round 1: a system prompt the cache has not seen; round 2: the same prompt again);
    `repeats` times with another system prompt each, the median of each round's p50 (and p99) reported; the
    ratios of the p50s."""
    systems = [shared_system_prompt(shop=k) for k in range(repeats)]
    out = {"clients": clients, "max_tokens": max_tokens, "repeats": repeats}
    for name, flag in (("with_cache", "--prefix-cache"), ("without_cache", "--no-prefix-cache")):
        with Server([*model_args, *common, "--max-slots", str(clients), flag]) as base:
            url = f"{base}/v1/chat/completions"
            asyncio.run(run_shared(url, "You are terse.", 2, 4, 10_000))  # warm-up: not the shared prompt
            runs = [[asyncio.run(run_shared(url, system, clients, max_tokens, (2 * k + r) * clients))
                     for r in range(2)] for k, system in enumerate(systems)]
            rounds = [{key: statistics.median(run[r][key] for run in runs) for key in ("ttft_p50_s", "ttft_p99_s")}
                      | {"runs_ttft_p50_s": [run[r]["ttft_p50_s"] for run in runs]} for r in range(2)]
            out[name] = {"rounds": rounds, "metrics": prefix_metrics(base)}
    for r in range(2):
        out[f"round{r + 1}_ttft_p50_ratio"] = (out["with_cache"]["rounds"][r]["ttft_p50_s"]
                                               / out["without_cache"]["rounds"][r]["ttft_p50_s"])
    return out


def generate_baseline(model_name: str, max_tokens: int, threads: int, n: int = 4, quantize: str | None = None) -> dict:
    import torch

    import pocketlm
    from pocketlm.engine.generate import generate_full

    torch.set_num_threads(threads)
    if model_name == "default":  # as `pocketlm serve` loads it (cli._use_default_model: a quantized GGUF as it is)
        import argparse

        from pocketlm.cli import _use_default_model
        args = argparse.Namespace(model=None, dtype=None, quantize=quantize, device="cpu")
        _use_default_model(args)
        model = pocketlm.load(args.model, dtype=args.dtype, quantize=args.quantize)
    else:
        model = pocketlm.load(model_name, quantize=quantize)
    tok = model_tokenizer(model_name)
    tokens, t0 = 0, time.perf_counter()
    for i in range(n):
        msgs = body(i, max_tokens)["messages"]
        # generate() has no logit_bias: a reply may stop early, so count what it produced
        tokens += generate_full(model, tok, msgs, max_tokens=max_tokens, temperature=0,
                                chat_format=model.config.chat_format).completion_tokens  # as the server renders
    wall = time.perf_counter() - t0
    return {"requests": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--quantize", default=None, help="passed to `pocketlm serve --quantize` (e.g. q8_0)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per level and per shared-prompt round; the median is reported")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled (seed 0)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shared-clients", type=int, default=16,
                    help="clients sharing a 500-token system prompt, with and without prefix caching (0: skip)")
    ap.add_argument("--shared-max-tokens", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON output (default: <tmp>/pocketlm-bench/serve-<device>.json)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    levels = [int(x) for x in args.levels.split(",")]
    NO_STOP.update(stop_bias(model_tokenizer(args.model)))
    if args.temperature > 0:
        SAMPLING.update(temperature=args.temperature, top_p=args.top_p, seed=0)
    model_args = ([] if args.model == "default" else [args.model]) + (["--quantize", args.quantize] if args.quantize
                                                                       else [])
    load_before = os.getloadavg()[0]
    common = ["--threads", str(args.threads), "--device", args.device]
    server = Server([*model_args, *common, "--max-slots", str(max(levels)),
                     "--context-length", str(min(1024, 64 + args.max_tokens * 2))])
    cmd = server.cmd
    with server as root:
        url = f"{root}/v1/chat/completions"
        asyncio.run(run_level(url, 2, 8))  # warm-up
        rounds: dict[int, list[dict]] = {c: [] for c in levels}
        for _ in range(args.repeats):  # round-robin: each round runs every level once, seconds apart
            for c in levels:
                rounds[c].append(asyncio.run(run_level(url, c, args.max_tokens)))
    rows = []
    for c in levels:  # the median run of each level (by aggregate tokens/s): one run is a fraction of a second
        runs = sorted(rounds[c], key=lambda r: r["tokens_per_s"])
        rows.append(runs[len(runs) // 2] | {"runs_tokens_per_s": [r["tokens_per_s"] for r in rounds[c]]})
    for r in rows:  # the measure: aggregate tokens/s against one stream's, paired within each round
        if 1 in rounds:
            ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rounds[r["concurrency"]], rounds[1])]
            r["ratio_to_single_stream_per_round"] = ratios
            r["ratio_to_single_stream"] = statistics.median(ratios)
        else:
            r["ratio_to_single_stream"] = None
    shared = (shared_prompt_scenario(model_args, common, args.shared_clients, args.shared_max_tokens, args.repeats)
              if args.shared_clients > 0 else None)
    base = (generate_baseline(args.model, args.max_tokens, args.threads, quantize=args.quantize)
            if args.device == "cpu" else None)
    load_after = os.getloadavg()[0]
    how = f"temperature {args.temperature}, top_p {args.top_p}" if args.temperature > 0 else "greedy"
    print(f"\npocketlm serve, model {args.model}{' --quantize ' + args.quantize if args.quantize else ''}, "
          f"{args.max_tokens} tokens per request, {how}, torch threads {args.threads}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load average (1 min) "
          f"{load_before:.1f} before / {load_after:.1f} after")
    print(f"{'concurrent':>10} {'tokens':>7} {'wall s':>8} {'agg tok/s':>10} {'x c=1':>6} {'one-at-a-time tok/s':>20} "
          f"{'speedup':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for r in rows:
        x1 = f"{r['ratio_to_single_stream']:>5.2f}x" if r["ratio_to_single_stream"] else f"{'':>6}"
        print(f"{r['concurrency']:>10} {r['tokens']:>7} {r['wall_s']:>8.2f} {r['tokens_per_s']:>10.1f} {x1} "
              f"{r['sequential_tokens_per_s']:>20.1f} {r['speedup']:>7.2f}x {r['ttft_p50_s'] * 1000:>12.1f} "
              f"{r['ttft_p99_s'] * 1000:>12.1f}")
    if base:
        print(f"in-process pocketlm.engine.generate, one at a time ({base['requests']} requests): "
              f"{base['tokens_per_s']:.1f} tokens/s")
    if shared:
        print(f"\n{shared['clients']} clients sharing a ~500-token system prompt, {shared['max_tokens']} tokens each:")
        print(f"{'round':>6} {'cache':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
        for r in range(2):
            for name in ("with_cache", "without_cache"):
                row = shared[name]["rounds"][r]
                print(f"{r + 1:>6} {name.split('_')[0]:>8} {row['ttft_p50_s'] * 1000:>12.1f} "
                      f"{row['ttft_p99_s'] * 1000:>12.1f}")
            print(f"{'':>6} TTFT p50 with / without: {shared[f'round{r + 1}_ttft_p50_ratio']:.3f} (target <= 0.333)")
        m = shared["with_cache"]["metrics"]
        if m:
            print(f"prefix cache: hit rate {m.get('hit_rate', 0):.3f} ({m.get('hit_tokens_total', 0):.0f} hit, "
                  f"{m.get('miss_tokens_total', 0):.0f} computed prompt tokens)")
    result = {"model": args.model, "quantize": args.quantize, "load_average_1min": [load_before, load_after],
              "max_tokens": args.max_tokens, "threads": args.threads, "device": args.device, "repeats": args.repeats,
              "sampling": dict(SAMPLING),
              "levels": rows, "generate_baseline": base, "shared_system_prompt": shared,
              "command": " ".join(cmd[1:])}
    out = args.out or os.path.join(tempfile.gettempdir(), "pocketlm-bench", f"serve-{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
