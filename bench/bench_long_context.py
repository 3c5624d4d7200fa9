"""Long-prompt prefill and decode on the phi-3-mini-128k shape: pocketlm's CPU engine against llama.cpp, same file.

    python bench/bench_long_context.py [--layers 2] [--lengths 4096,16384,32768] [--decode 16] [--threads N]
                                       [--repeats 1] [--llama-fa on|off|on,off] [--profile] [--quick] [--out FILE]

1. Weights: the phi-3-mini-128k shape (hidden 3072, 32 heads of 96, no GQA, LongRoPE switching at 4096, the
   April 2024 factors) with `--layers` decoder layers (default 2: the cost per layer is what is compared, and a
   32K prompt through 32 layers takes too long on a 2-core machine), random Q4_0 codes
   (`pocketlm.quant.random_model.write_random_gguf`, written once to `$TMPDIR`). Both engines load this file.
2. For every length N in `--lengths`, each engine runs in its own process (alternately, `--repeats` times, median
   reported), with the same `--threads`, and a context of N + `--decode` tokens:
   - llama.cpp through llama-cpp-python: n_ctx = N + decode, n_batch 2048 and n_ubatch 512 (llama.cpp's own
     defaults), f16 KV cache; flash attention per `--llama-fa` (llama.cpp's own default "auto" turns it on for
     the CPU; llama-cpp-python's default is off; with `on,off` both run and the faster is the baseline). The
     prompt in one `eval` (its 512-token micro-batches), then `--decode` greedy tokens one `eval` each.
     With n_ctx > 4096 llama.cpp rotates every position with the long LongRoPE factors (its rule: the context
     size, not the sequence length, picks the set).
   - pocketlm: `pocketlm.load` (kernels) + `engine.cpu.accelerate` (f16 KV cache of N + decode positions): the
     prompt in 512-token chunks exactly as `engine.generate.prefill` runs them (each chunk one C call through
     every layer, `FastDecoder.prefill_chunk` / kernels.c pl_prefill: matrix products on the kernels, blocked
     flash attention against the cache), with the LongRoPE factor set of the final
     length N + decode (the long set at every length above 4096 - decode, as llama.cpp), then `--decode` greedy
     tokens through the C decode step. Every decoded token is timed alone; decode tokens/s (both sides) is 1 / the
     median time of the tokens after the first (buffer binding, llama.cpp's graph rebuild for batch 1), so one
     token that another process preempted does not move it. Each side reads the logits it decodes from (llama.cpp:
     the C logits buffer; `llm.scores` is not filled without logits_all) and checks them finite.
   The run order alternates (llama.cpp first, then pocketlm first, ...) and the figures are medians over
   `--repeats` with the min-max range.
   **Contention**: every worker records its threads' run-queue wait (/proc/self/task/*/schedstat: time runnable
   but without a core) and the table prints it as a share of the threads' time. It matters most for llama.cpp:
   its threads spin at a barrier after every graph op, so when another process holds one of 2 cores a 2-thread
   llama.cpp waits out that process's time slice at every op (on this 2-core machine its decode went from about
   6 ms to about 240 ms per token, run-queue wait equal to the token time), while pocketlm's threads claim work
   chunks dynamically and degrade in proportion. Compare engines only from runs whose wait shares are both low;
   with other load present, `--threads 1` gives the fairer comparison.
   Both sides are checked to have processed the whole prompt (llama.cpp's own prompt-token counter; pocketlm's
   cache length and factor set), and the last prompt position's logits of the two engines are compared (cosine
   and top-1: the same model computed twice; random weights make attention nearly uniform, so this is a sanity
   check of the weights and the pipeline, not a proof of the rotary factors).
3. `--profile` splits pocketlm's prefill time into the kernel matrix products (activation quantization
   included), attention, the element-wise rows (norms, RoPE + KV-cache store, SiLU, residuals: pl_prefill's own
   timers) and the rest (embedding, final norm and lm_head of the last row, Python); on the PyTorch prompt path
   (`c_prefill` off) into matrix products, SDPA attention, KV-cache store/read and the rest.
Prints the instruction set, the load average, a table with the ratios pocketlm / llama.cpp, and writes JSON
(default bench/results/bench_long_context.json; `--quick`, 1 layer at 1024 and 2048 tokens, writes to $TMPDIR).
On a shared machine other load moves every number: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_long_context.json"
PRESET = "phi-3-mini-128k"
CHUNK = 512  # engine.generate.DEFAULT_PREFILL_CHUNK_SIZE, checked in worker_pocketlm


sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when this file is loaded by path
from bench_kquant import sched_s  # noqa: E402  one /proc schedstat reader for both benches


def prompt_ids(n: int, vocab: int = 32000, seed: int = 0) -> list[int]:
    import random
    r = random.Random(seed)
    return [1] + [r.randrange(100, vocab) for _ in range(n - 1)]


def decode_phase(step, tok: int, count: int) -> tuple[int, dict]:
    """`count` greedy tokens, `step(tok) -> next tok`, each timed alone: wall, run-queue wait and CPU seconds."""
    times, waits, cpus = [], [], []
    for _ in range(count):
        (c, w), t = sched_s(), time.perf_counter()
        tok = step(tok)
        times.append(time.perf_counter() - t)
        c2, w2 = sched_s()
        waits.append(w2 - w)
        cpus.append(c2 - c)
    return tok, {"token_s": times, "token_wait_s": waits, "token_cpu_s": cpus}


def decode_threads(threads: int) -> list[int]:
    """The thread counts decode is timed at after each prompt: `threads`, then 1 (when `threads` > 1)."""
    return [threads, 1] if threads > 1 else [threads]


def context_length(n: int, decode: int, threads: int) -> int:
    """Context of a worker: the prompt plus `decode` tokens per decode phase."""
    return n + decode * len(decode_threads(threads))


def runqueue_wait_s() -> float:
    """Seconds this process's threads (all of them, summed) have spent runnable but waiting for a core
    (/proc/self/task/*/schedstat, field 2): the direct measure of CPU contention from other processes. On a
    shared 2-core machine it explains odd numbers: llama.cpp's worker threads spin at a barrier after every op,
    so when another process holds one core a 2-thread llama.cpp waits out that process's time slice at every
    op (decode fell from ~6 ms to ~240 ms per token in such a case, with ~240 ms of run-queue wait per token)."""
    import glob
    total = 0
    for f in glob.glob("/proc/self/task/*/schedstat"):
        try:
            total += int(open(f).read().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that exited meanwhile
            pass
    return total / 1e9


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


# ----- workers (child processes, one length each) ---------------------------------------------------------------

class _Timers:
    """Wall time spent inside wrapped callables (pocketlm's prefill profile)."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t
        return timed


def worker_pocketlm(a) -> dict:
    import numpy as np
    import torch

    import pocketlm
    from pocketlm.engine import cpu
    from pocketlm.engine.generate import DEFAULT_PREFILL_CHUNK_SIZE
    from pocketlm.quant import kernels
    from pocketlm.quant.linear import QuantizedLinear
    assert DEFAULT_PREFILL_CHUNK_SIZE == CHUNK, "the bench must prefill as the engine does"
    kernels.set_threads(a.threads)
    torch.set_num_threads(a.threads)
    model = pocketlm.load(a.gguf)
    fast = cpu.accelerate(model, "f16")
    assert isinstance(fast, cpu.FastDecoder), "the model did not land on the compiled kernels"
    n, ctx = a.length, context_length(a.length, a.decode, a.threads)
    mode = fast.rope_mode_for(ctx)
    timers = _Timers()
    if a.profile:  # class-level wrappers: every QuantizedLinear, every SDPA call, every cache store/read
        QuantizedLinear.forward = timers.wrap("matmul", QuantizedLinear.forward)
        torch.nn.functional.scaled_dot_product_attention = timers.wrap(
            "attention", torch.nn.functional.scaled_dot_product_attention)
        cpu.FastKVCache.update = timers.wrap("kv_cache", cpu.FastKVCache.update)
    ids = torch.tensor([prompt_ids(n)], dtype=torch.long)  # (1, n)
    out = {"engine": "pocketlm", "isa": kernels.isa(), "rope_mode": mode}
    with torch.inference_mode():
        cache = fast.make_cache(1, ctx)
        w, t = runqueue_wait_s(), time.perf_counter()
        for start in range(0, n, CHUNK):  # engine.generate.prefill's loop, with the final length's factor set
            logits = fast(ids[:, start:start + CHUNK], cache, last_only=True, rope_mode=mode)  # (1, 1, V)
        out["prompt_s"] = time.perf_counter() - t
        out["prompt_wait_s"] = runqueue_wait_s() - w
        if cache.length != n or cache.rope_mode != mode:
            raise SystemExit(f"pocketlm prefilled {cache.length} tokens with {cache.rope_mode!r}, not {n} / {mode!r}")
        out["prompt_tokens"] = cache.length
        last = logits[0, -1].float()
        if not torch.isfinite(last).all():
            raise SystemExit(f"pocketlm's logits after the prompt hold {int((~torch.isfinite(last)).sum())} "
                             "non-finite values")
        np.save(a.logits_out, last.numpy())
        if a.profile:
            out["profile_s"] = dict(timers.s)
            if fast.c_prefill:  # the chunks ran in C (pl_prefill): its own split of the time
                import ctypes
                parts = (ctypes.c_double * 3)()
                kernels._load().pl_prefill_profile(parts, 1)
                out["profile_s"].update(matmul=parts[0], attention=parts[1], elementwise=parts[2])
            out["profile_s"]["other"] = out["prompt_s"] - sum(out["profile_s"].values())
        tok = int(last.argmax())

        def step(tok: int) -> int:
            return int(fast(torch.tensor([[tok]]), cache, last_only=True, rope_mode=mode)[0, -1].argmax())
        # the first token binds the C step's buffers: left out of the figures
        tok, out["decode"] = decode_phase(step, tok, a.decode)
        if a.threads > 1:  # then on 1 thread (see the module docstring: contention)
            kernels.set_threads(1)
            torch.set_num_threads(1)
            tok, out["decode_1t"] = decode_phase(step, tok, a.decode)
        out["final_length"] = cache.length
    out["rss_gb"] = rss_gb()
    return out


def worker_llamacpp(a) -> dict:
    import llama_cpp
    import numpy as np
    n, ctx = a.length, context_length(a.length, a.decode, a.threads)
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=ctx, n_batch=2048, n_ubatch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, flash_attn=a.fa == "on", verbose=False)
    out = {"engine": f"llama.cpp (fa {a.fa})", "version": llama_cpp.__version__, "n_ctx": llm.n_ctx(),
           "n_batch": llm.n_batch, "rope_mode": "long" if llm.n_ctx() > 4096 else "short"}
    vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,)).copy()

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    w, t = runqueue_wait_s(), time.perf_counter()
    llm.eval(prompt_ids(n))
    out["prompt_s"] = time.perf_counter() - t
    out["prompt_wait_s"] = runqueue_wait_s() - w
    last = last_logits()
    if not np.isfinite(last).all():
        raise SystemExit(f"llama.cpp's logits after the prompt hold {int((~np.isfinite(last)).sum())} non-finite "
                         "values")
    np.save(a.logits_out, last)
    tok = int(np.argmax(last))

    def step(tok: int) -> int:
        llm.eval([tok])
        return int(np.argmax(last_logits()))  # llm.scores is not filled without logits_all: read the C buffer
    # the first token rebuilds llama.cpp's graph for batch 1: left out of the figures
    tok, out["decode"] = decode_phase(step, tok, a.decode)
    if a.threads > 1:  # then on 1 thread (see the module docstring: contention)
        llm._ctx.set_n_threads(1, 1)
        tok, out["decode_1t"] = decode_phase(step, tok, a.decode)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    out["prompt_tokens"], out["c_n_decode"] = perf.n_p_eval, perf.n_eval
    out["c_prompt_s"], out["c_decode_s"] = perf.t_p_eval_ms / 1e3, perf.t_eval_ms / 1e3
    out["final_length"] = llm.n_tokens
    if perf.n_p_eval != n or llm.n_tokens != ctx:
        raise SystemExit(f"llama.cpp evaluated {perf.n_p_eval} prompt tokens (want {n}), {llm.n_tokens} in all "
                         f"(want {ctx})")
    out["rss_gb"] = rss_gb()
    llm.close()
    return out


# ----- parent ---------------------------------------------------------------------------------------------------

def run_worker(kind: str, a, length: int, fa: str, logits_out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--gguf", a.gguf, "--length", str(length), "--decode",
           str(a.decode), "--threads", str(a.threads), "--fa", fa, "--logits-out", logits_out] + \
          (["--profile"] if a.profile else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), POCKETLM_NUM_THREADS=str(a.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} worker failed at {length} tokens:\n{r.stderr[-3000:]}{r.stdout[-2000:]}")
    return summarise_run(json.loads(r.stdout.strip().splitlines()[-1]), length, a.threads)


def summarise_run(r: dict, length: int, threads: int) -> dict:
    """Add one worker's figures: prompt tok/s; decode tok/s = 1 / the median time of the decoded tokens after
    the first (robust to a token that another process preempted); the contention shares = run-queue wait /
    (wall time x threads), 0 on an idle machine, towards 1 when the threads mostly wait for a core. With the
    1-thread decode phase (`decode_1t`): its wall tok/s, wait share, and tokens per CPU-second (`..._cpu_tok_s`:
    one thread that never waits at a barrier, so CPU time is the work done, whatever other processes run)."""
    r["prompt_tok_s"] = length / r["prompt_s"]
    r["prompt_wait_share"] = r["prompt_wait_s"] / (r["prompt_s"] * threads)
    for key, n in zip(("decode", "decode_1t"), decode_threads(threads)):
        if key not in r:
            continue
        times, waits, cpus = (r[key][f][1:] for f in ("token_s", "token_wait_s", "token_cpu_s"))
        r[f"{key}_s"] = sum(times)
        r[f"{key}_tok_s"] = 1.0 / statistics.median(times)
        r[f"{key}_wait_share"] = sum(waits) / (sum(times) * n)
        if n == 1:
            r[f"{key}_cpu_tok_s"] = 1.0 / statistics.median(cpus)
    return r


def compare_logits(ours: str, theirs: str) -> dict:
    import numpy as np
    x, y = np.load(ours).astype(np.float64), np.load(theirs).astype(np.float64)
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    top10 = len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10]))
    return {"cosine": cos, "top1_same": bool(np.argmax(x) == np.argmax(y)), "top10_overlap": top10}


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--lengths {text!r} is not a comma-separated list of integers") from None
    if not lengths or any(n < 2 for n in lengths):
        raise SystemExit(f"--lengths {text!r}: give at least one length of 2 or more tokens")
    return lengths


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; --quick: 1)")
    ap.add_argument("--lengths", default=None, help="prompt lengths (default 4096,16384,32768; --quick: 1024,2048)")
    ap.add_argument("--decode", type=int, default=16, help="greedy tokens decoded after each prompt (the first is "
                                                          "a warm-up: decode tok/s is over the other ones)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--llama-fa", default="on", help="llama.cpp flash attention: on, off, or on,off (faster wins)")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--profile", action="store_true", help="split pocketlm's prefill time by part")
    ap.add_argument("--quick", action="store_true", help="1 layer, lengths 1024,2048 (a smoke run; JSON to $TMPDIR)")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=["pocketlm", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fa", default="on", help=argparse.SUPPRESS)
    ap.add_argument("--logits-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker_pocketlm(a) if a.worker == "pocketlm" else worker_llamacpp(a)))
        return None

    from pocketlm.config import preset
    from pocketlm.quant import kernels
    from pocketlm.quant.random_model import write_random_gguf
    a.layers = a.layers or (1 if a.quick else 2)
    lengths = parse_lengths(a.lengths or ("1024,2048" if a.quick else "4096,16384,32768"))
    fas = [v.strip() for v in a.llama_fa.split(",")]
    if not fas or any(v not in ("on", "off") for v in fas):
        raise SystemExit(f"--llama-fa {a.llama_fa!r}: give on, off or on,off")
    if a.layers < 1 or a.decode < 2 or a.repeats < 1:
        raise SystemExit(f"--layers {a.layers}, --decode {a.decode}, --repeats {a.repeats}: need >= 1, >= 2 (the "
                         "first decoded token is a warm-up), >= 1")
    config = preset(PRESET).replace(num_hidden_layers=a.layers)
    a.threads = a.threads or kernels.default_threads()
    if context_length(max(lengths), a.decode, a.threads) > config.max_position_embeddings:
        raise SystemExit(f"{max(lengths)} + {a.decode} tokens x {len(decode_threads(a.threads))} decode phases "
                         f"exceed the {config.max_position_embeddings}-token context")
    tmp = Path(tempfile.gettempdir())
    a.gguf = a.gguf or str(tmp / f"pocketlm-bench-longctx-{a.layers}l-q4_0.gguf")
    if a.out is None:
        a.out = str(tmp / "pocketlm-bench-long-context-quick.json") if a.quick else str(RESULTS)
    if not Path(a.gguf).exists():
        print(f"writing {a.gguf} (random Q4_0 weights, {PRESET} shape, {a.layers} layers) ...", flush=True)
        write_random_gguf(config, a.gguf, "Q4_0")
    load_before = os.getloadavg()
    print(f"instruction set: {kernels.isa()}; {a.threads} threads; {os.cpu_count()} cores; load average "
          f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    kinds = ([] if a.skip_llama else [("llamacpp", fa) for fa in fas]) + [("pocketlm", "-")]
    runs: dict[int, dict[str, list[dict]]] = {}
    checks: dict[int, dict] = {}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        for n in lengths:
            runs[n] = {}
            for i in range(a.repeats):  # alternating order (A B, B A, ...): drifting load hits both sides
                for kind, fa in (kinds if i % 2 == 0 else kinds[::-1]):
                    logits = str(Path(scratch) / f"{kind}-{fa}-{n}-{i}.npy")
                    r = run_worker(kind, a, n, fa, logits)
                    r["logits_file"] = logits
                    r["load_avg_1m"] = os.getloadavg()[0]
                    runs[n].setdefault(r["engine"], []).append(r)
                    print(f"  {n} tokens, run {i + 1}, {r['engine']}: prompt {r['prompt_tok_s']:.1f} tok/s (waiting "
                          f"for a core {r['prompt_wait_share']:.0%}), decode {r['decode_tok_s']:.2f} tok/s (waiting "
                          f"{r['decode_wait_share']:.0%})" + (
                              f", 1 thread {r['decode_1t_tok_s']:.2f} tok/s (waiting {r['decode_1t_wait_share']:.0%}"
                              f", {r['decode_1t_cpu_tok_s']:.2f} per CPU-second)" if "decode_1t" in r else "") +
                          f"; load {r['load_avg_1m']:.2f}", flush=True)
            ours = runs[n]["pocketlm"][0]["logits_file"]
            checks[n] = {name: compare_logits(ours, rows[0]["logits_file"])
                         for name, rows in runs[n].items() if name != "pocketlm"}
        for per in runs.values():
            for rows in per.values():
                for r in rows:
                    del r["logits_file"]
    load_after = os.getloadavg()

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    table = []
    for n in lengths:
        rows = {}
        for name, rs in runs[n].items():
            rows[name] = {"prompt_tok_s": n / med(rs, "prompt_s"), "decode_tok_s": med(rs, "decode_tok_s"),
                          "prompt_tok_s_range": [min(r["prompt_tok_s"] for r in rs),
                                                 max(r["prompt_tok_s"] for r in rs)],
                          "decode_tok_s_range": [min(r["decode_tok_s"] for r in rs),
                                                 max(r["decode_tok_s"] for r in rs)],
                          "prompt_wait_share": med(rs, "prompt_wait_share"),
                          "decode_wait_share": med(rs, "decode_wait_share"),
                          "rope_mode": rs[0]["rope_mode"], "prompt_tokens": rs[0]["prompt_tokens"],
                          "rss_gb": med(rs, "rss_gb")}
            if "decode_1t" in rs[0]:
                rows[name].update({k: med(rs, k) for k in ("decode_1t_tok_s", "decode_1t_wait_share",
                                                           "decode_1t_cpu_tok_s")})
        entry = {"length": n, "pocketlm": rows.pop("pocketlm"), "llama_cpp": rows, "logits_check": checks[n]}
        if rows:
            best = max(rows, key=lambda k: rows[k]["prompt_tok_s"])
            entry["baseline"] = best
            entry["prompt_vs_llama_cpp"] = entry["pocketlm"]["prompt_tok_s"] / rows[best]["prompt_tok_s"]
            for key in ("decode_tok_s", "decode_1t_tok_s", "decode_1t_cpu_tok_s"):
                if key in entry["pocketlm"]:
                    entry[key.replace("tok_s", "vs_llama_cpp")] = entry["pocketlm"][key] / max(
                        r[key] for r in rows.values())
        if a.profile:
            entry["pocketlm"]["profile_s"] = runs[n]["pocketlm"][0]["profile_s"]
        table.append(entry)

    print(f"\n{PRESET} shape, {a.layers} layer(s), random Q4_0 weights, {a.threads} threads, {a.decode} decoded "
          f"tokens after each prompt, median of {a.repeats}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    print("(min-max over the runs in brackets; wait = share of the threads' time spent waiting for a core)")
    print(f"{'length':>7} {'engine':<20} {'prompt tok/s':>21} {'wait':>5} {'decode tok/s':>21} {'wait':>5} "
          f"{'rope':>5} {'prompt x':>9} {'decode x':>9}")
    for e in table:
        for name, r in [("pocketlm", e["pocketlm"])] + list(e["llama_cpp"].items()):
            px = f"{e['prompt_vs_llama_cpp']:.2f}x" if name == "pocketlm" and "baseline" in e else ""
            dx = f"{e['decode_vs_llama_cpp']:.2f}x" if name == "pocketlm" and "baseline" in e else ""
            pr = "{:.1f} [{:.1f}-{:.1f}]".format(r["prompt_tok_s"], *r["prompt_tok_s_range"])
            dr = "{:.2f} [{:.2f}-{:.2f}]".format(r["decode_tok_s"], *r["decode_tok_s_range"])
            print(f"{e['length']:>7} {name:<20} {pr:>21} {r['prompt_wait_share']:>5.0%} {dr:>21} "
                  f"{r['decode_wait_share']:>5.0%} {r['rope_mode']:>5} {px:>9} {dx:>9}")
            if "decode_1t_tok_s" in r:
                x = (f"; ratio {e['decode_1t_vs_llama_cpp']:.2f}x wall, {e['decode_1t_cpu_vs_llama_cpp']:.2f}x per "
                     "CPU-second" if name == "pocketlm" and "baseline" in e else "")
                print(f"{'':>7} {name} decode on 1 thread: {r['decode_1t_tok_s']:.2f} tok/s (waiting "
                      f"{r['decode_1t_wait_share']:.0%}), {r['decode_1t_cpu_tok_s']:.2f} per CPU-second{x}")
        for name, c in e["logits_check"].items():
            print(f"{'':>7} logits vs {name}: cosine {c['cosine']:.4f}, top-1 same {c['top1_same']}, top-10 "
                  f"overlap {c['top10_overlap']}/10")
        if a.profile:
            p = e["pocketlm"]["profile_s"]
            print(f"{'':>7} pocketlm prefill: " + ", ".join(f"{k} {v:.2f} s" for k, v in p.items()))
    result = {"preset": PRESET, "layers": a.layers, "type": "Q4_0", "threads": a.threads, "decode": a.decode,
              "decode_threads": decode_threads(a.threads),
              "lengths": lengths, "repeats": a.repeats, "llama_fa": fas, "prefill_chunk": CHUNK, "table": table,
              "runs": {str(k): v for k, v in runs.items()}, "wall_s": time.time() - t_start,
              "load_avg": {"before": list(load_before), "after": list(load_after)},
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "isa": kernels.isa()}, "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
