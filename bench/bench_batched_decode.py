"""The serving engine's decode throughput in-process (no HTTP): the batched C step (engine/cpu_batch.py) against
the PyTorch `forward_batched` path it replaces, at 1, 4, 8, 16 and 32 concurrent greedy requests.

For each path and level c: c completion requests (distinct prompts, `--max-tokens` tokens each, stop ids biased
away) are submitted at once to a `serve.batching.Engine` and drained from their event queues in this process.
Reported per row: wall tokens/s, tokens per CPU-second of this process (`time.process_time`, all threads: less
sensitive than wall time to other load on a shared machine), both as ratios to the same path's c = 1 row, and
the C path's speedup over the PyTorch path. The 1-minute load average is recorded before and after.

    python bench/bench_batched_decode.py [--model default|PATH] [--quantize q8_0] [--levels 1,4,8,16,32]
                                         [--max-tokens 64] [--out bench/results/bench_batched_decode.json]

The model must run on the CPU kernels (a quantized GGUF, or `--quantize` for a float model); kernel threads:
POCKETLM_NUM_THREADS (default: the cores this process may use); torch threads 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import torch
from bench_serve import stop_bias  # this folder's HTTP bench: the same stop-id bias


def run_level(engine, tok, model, c: int, max_tokens: int) -> dict:
    from pocketlm.serve.schemas import Limits, parse_request

    no_stop = stop_bias(tok)  # every reply runs to max_tokens
    gens = [parse_request({"model": "m", "prompt": f"Request {i}: say something about {i}.", "max_tokens": max_tokens,
                           "temperature": 0, "logit_bias": no_stop}, "completion", tokenizer=tok, model_names=["m"],
                          limits=Limits(max_n=1, context_length=engine.context_length),
                          vocab_size=model.config.vocab_size) for i in range(c)]

    async def main():
        loop = asyncio.get_running_loop()

        async def one(gen):
            q = asyncio.Queue()
            engine.submit(gen, loop, q)
            n = 0
            while (ev := await q.get())["type"] != "done":
                if ev["type"] == "error":
                    raise RuntimeError(ev)
                n += ev["type"] == "token"
            return n
        return sum(await asyncio.gather(*[one(g) for g in gens]))

    t0, c0 = time.perf_counter(), time.process_time()
    tokens = asyncio.run(main())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"concurrency": c, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / cpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--levels", default="1,4,8,16,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_batched_decode.json"))
    args = ap.parse_args(argv)
    import pocketlm
    from pocketlm import Tokenizer
    from pocketlm.api import default_model_path
    from pocketlm.serve.batching import Engine

    torch.set_num_threads(1)
    levels = [int(x) for x in args.levels.split(",")]
    path = str(default_model_path()) if args.model == "default" else args.model
    model = pocketlm.load(path, dtype="float32" if args.model == "default" else None, quantize=args.quantize)
    tok = Tokenizer.from_pretrained(path)  # the default model's folder: its one GGUF file's vocabulary
    load_before = os.getloadavg()[0]
    rows = {}
    for name in ("c_batch", "torch"):
        engine = Engine(model, tok, max_slots=max(levels), max_queue=64, context_length=64 + 2 * args.max_tokens)
        if engine.batch_decoder is None:
            raise SystemExit(f"{args.model}: its linears are not on the CPU kernels (try --quantize q8_0)")
        if name == "torch":
            engine.batch_decoder = None  # the forward_batched path (same cache type)
        try:
            run_level(engine, tok, model, 2, 8)  # warm-up
            rows[name] = [run_level(engine, tok, model, c, args.max_tokens) for c in levels]
        finally:
            engine.shutdown()
    load_after = os.getloadavg()[0]
    print(f"\nserving engine in-process, model {args.model}{' --quantize ' + args.quantize if args.quantize else ''}, "
          f"{args.max_tokens} tokens per request, greedy, {os.cpu_count()} cpus, load average (1 min) "
          f"{load_before:.1f} before / {load_after:.1f} after")
    print(f"{'concurrent':>10} {'path':>8} {'tok/s':>8} {'x c=1':>6} {'tok/cpu-s':>10} {'x c=1':>6} "
          f"{'C vs torch tok/s':>17} {'C vs torch tok/cpu-s':>21}")
    for i, c in enumerate(levels):
        for name in ("c_batch", "torch"):
            r, r1 = rows[name][i], rows[name][0]
            r["ratio_to_single"] = r["tokens_per_s"] / r1["tokens_per_s"]
            r["cpu_ratio_to_single"] = r["tokens_per_cpu_s"] / r1["tokens_per_cpu_s"]
            vs = ""
            if name == "c_batch":
                t = rows["torch"][i]
                vs = (f"{r['tokens_per_s'] / t['tokens_per_s']:>16.2f}x "
                      f"{r['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:>20.2f}x")
            print(f"{c:>10} {name:>8} {r['tokens_per_s']:>8.1f} {r['ratio_to_single']:>5.2f}x "
                  f"{r['tokens_per_cpu_s']:>10.1f} {r['cpu_ratio_to_single']:>5.2f}x {vs}")
    result = {"model": args.model, "quantize": args.quantize, "max_tokens": args.max_tokens,
              "load_average_1min": [load_before, load_after], "levels": rows, "command": " ".join(sys.argv)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
