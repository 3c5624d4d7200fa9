"""Two builds of the CPU kernels in one process, alternated: the batched decode step (engine/cpu_batch.py's one C
call per step for B rows, kernels.c pl_decode_batch) of a base revision's kernels.c against the working tree's.

On a shared machine whose speed drifts by tens of percent from minute to minute, two benchmark runs one after
the other compare the drift as much as the code. Here both libraries are loaded side by side (each its own
thread pool), and for each point (B rows, each attending over `keys` cached keys of an f16 slot cache filled
with random values, or a q8_0 one with `--kv q8_0`) the two take turns: `--rounds` rounds of `--steps` steps each, the best round of each build
reported. Reported per point: ms per step and tokens/s of each build, and base / candidate (above 1: the
candidate is faster).

`--prefill NxT,...` adds prompt points (the server's time to first token): N prompts of T random tokens each
through one `FastDecoder.prefill_chunks` call (kernels.c pl_prefill_segs: the rows of all prompts share each
matrix product) into fresh f16 caches, the two builds alternated the same way (`--rounds` rounds of `--steps`
calls); reported as ms per call and prompt tokens/s.

    python bench/bench_kernel_ab.py --base REV [--candidate FILE] [--model default|PATH]
                                    [--points 1x48,32x48,32x150] [--prefill 32x25,1x400] [--rounds 8]
                                    [--steps 10] [--kv f16|q8_0] [--out bench/results/bench_kernel_ab.json]

REV is any git revision of this repository (its src/pocketlm/quant/kernels.c); --candidate defaults to the
working tree's file. Kernel threads: POCKETLM_NUM_THREADS (default: the cores this process may use); the
instruction set: POCKETLM_KERNEL_ISA (both builds get the same flags).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_build(kernels, source: Path):
    """kernels.c at `source` built and loaded as its own library (the module's cached one left as it was)."""
    saved = kernels.SOURCE, kernels._lib, kernels._error
    kernels.SOURCE, kernels._lib, kernels._error = source, None, None
    try:
        lib = kernels._load()
        if lib is None:
            raise SystemExit(f"{source}: {kernels._error}")
        return lib
    finally:
        kernels.SOURCE, kernels._lib, kernels._error = saved


def per_build(kernels, libs: dict, make) -> dict:
    """{name: make()} with the module's library set to each build's while its decoder is made (a decoder keeps
    the library it was made with: each calls its own build)."""
    out = {}
    for name, lib in libs.items():
        saved = kernels._lib
        kernels._lib = lib
        try:
            out[name] = make()
        finally:
            kernels._lib = saved
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision whose kernels.c is the baseline")
    ap.add_argument("--candidate", default=None, help="kernels.c to compare (default: the working tree's)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--points", default="1x48,32x48,32x150", help="B x keys, comma-separated")
    ap.add_argument("--prefill", default="", help="N x T prompt points (N prompts of T tokens), comma-separated")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--kv", default="f16", choices=("f16", "q8_0"),
                    help="the decode points' slot cache type (f16, the default; q8_0: `serve --kv-cache q8_0`)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_kernel_ab.json"))
    args = ap.parse_args(argv)
    import pocketlm
    from pocketlm.api import default_model_path
    from pocketlm.engine.cpu import FastDecoder
    from pocketlm.engine.cpu_batch import BatchDecoder
    from pocketlm.quant import kernels
    from pocketlm.serve.batching import SlotKVCache

    def pairs(text: str, what: str) -> list[tuple[int, int]]:
        out = []
        for p in filter(None, text.split(",")):
            a, _, b = p.partition("x")
            try:
                out.append((int(a), int(b)))
            except ValueError:
                raise SystemExit(f"{what}: {p!r} is not AxB (two whole numbers)") from None
        return out

    points = pairs(args.points, "--points")
    prefill_points = pairs(args.prefill, "--prefill")
    rel = "src/pocketlm/quant/kernels.c"
    base_src = subprocess.run(["git", "show", f"{args.base}:{rel}"], cwd=ROOT, capture_output=True, text=True)
    if base_src.returncode != 0:
        raise SystemExit(f"git show {args.base}:{rel}: {base_src.stderr.strip()}")
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    candidate = Path(args.candidate) if args.candidate else ROOT / rel
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / "kernels.c"
        base_path.write_text(base_src.stdout)
        libs = {"base": load_build(kernels, base_path), "candidate": load_build(kernels, candidate)}
    isa = kernels.ISA_NAMES[libs["candidate"].pl_isa()]
    threads = libs["candidate"].pl_get_threads()
    path = str(default_model_path()) if args.model == "default" else args.model
    label = args.model if args.model == "default" else Path(args.model).name  # no machine's folders in results
    model = pocketlm.load(path, dtype="float32" if args.model == "default" else None)
    rows = []
    for B, keys in points:
        cache = SlotKVCache(model.config, B, max(256, keys + 1), torch.float32, "cpu", args.kv)
        cache.ensure(keys)
        torch.manual_seed(0)
        for store in (cache.k, cache.v):
            if args.kv == "f16":
                store.normal_()
            else:  # q8_0 codes and f16 block scales of the size N(0, 1) values give
                store.codes.copy_(torch.randint(-127, 128, store.codes.shape, dtype=torch.int8))
                store.scales.fill_(1 / 48)
        decoders = per_build(kernels, libs, lambda: BatchDecoder(model))
        ids = [(i * 37) % (model.config.vocab_size - 10) + 5 for i in range(B)]
        slots, positions = list(range(B)), [keys - 1] * B
        best = {name: float("inf") for name in decoders}
        for _ in range(args.rounds):
            for name, bd in decoders.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    bd.step(ids, slots, positions, cache)
                best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
        rows.append({"B": B, "keys": keys, "base_ms": best["base"] * 1e3, "candidate_ms": best["candidate"] * 1e3,
                     "base_tokens_per_s": B / best["base"], "candidate_tokens_per_s": B / best["candidate"],
                     "speedup": best["base"] / best["candidate"]})
    prefill_rows = []
    for n, T in prefill_points:
        fast = per_build(kernels, libs, lambda: FastDecoder(model, "f16"))
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(5, model.config.vocab_size - 5, (1, T), generator=gen) for _ in range(n)]
        best = {name: float("inf") for name in fast}
        for _ in range(args.rounds):
            for name, fd in fast.items():
                caches = [[fd.make_cache(1, T + 1) for _ in range(n)] for _ in range(args.steps)]
                t0 = time.perf_counter()
                for step in range(args.steps):
                    fd.prefill_chunks([(prompts[i], caches[step][i], None) for i in range(n)])
                best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
        prefill_rows.append({"prompts": n, "tokens": T, "base_ms": best["base"] * 1e3,
                             "candidate_ms": best["candidate"] * 1e3, "base_tokens_per_s": n * T / best["base"],
                             "candidate_tokens_per_s": n * T / best["candidate"],
                             "speedup": best["base"] / best["candidate"]})
    cand_name = candidate.name if args.candidate else "working tree"
    print(f"\nbatched decode step, model {label}, {args.kv} cache, kernels {base_rev} (base) vs {cand_name} "
          f"(candidate), {isa}, "
          f"{threads} threads, best of {args.rounds} alternated rounds of {args.steps} steps")
    print(f"{'B':>4} {'keys':>5} {'base ms':>8} {'cand ms':>8} {'base tok/s':>11} {'cand tok/s':>11} {'speedup':>8}")
    for r in rows:
        print(f"{r['B']:>4} {r['keys']:>5} {r['base_ms']:>8.2f} {r['candidate_ms']:>8.2f} "
              f"{r['base_tokens_per_s']:>11.0f} {r['candidate_tokens_per_s']:>11.0f} {r['speedup']:>7.3f}x")
    if prefill_rows:
        print("\nprompt prefill (one prefill_chunks call of N prompts of T tokens), the same builds")
        print(f"{'N':>4} {'T':>5} {'base ms':>8} {'cand ms':>8} {'base tok/s':>11} {'cand tok/s':>11} {'speedup':>8}")
        for r in prefill_rows:
            print(f"{r['prompts']:>4} {r['tokens']:>5} {r['base_ms']:>8.2f} {r['candidate_ms']:>8.2f} "
                  f"{r['base_tokens_per_s']:>11.0f} {r['candidate_tokens_per_s']:>11.0f} {r['speedup']:>7.3f}x")
    command = ["python", "bench/bench_kernel_ab.py", "--base", base_rev, "--model", label, "--points", args.points]
    command += ["--kv", args.kv] if args.kv != "f16" else []
    command += ["--prefill", args.prefill] if args.prefill else []
    result = {"model": label, "kv": args.kv, "base": base_rev, "candidate": str(args.candidate or "working tree"),
              "isa": isa, "threads": threads, "cpu": platform.processor() or platform.machine(),
              "rounds": args.rounds, "steps": args.steps, "points": rows, "prefill": prefill_rows,
              "command": " ".join(command + ["--rounds", str(args.rounds), "--steps", str(args.steps)])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
