"""Long-prompt prefill and decode on the phi-3-mini-128k shape: pocketlm's CPU engine against llama.cpp, same file.

    python bench/bench_long_context.py [--layers 2] [--lengths 4096,16384,32768] [--decode 8] [--threads N]
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
     prompt in 512-token chunks exactly as `engine.generate.prefill` runs them (matrix products on the kernels,
     attention by PyTorch's blocked SDPA kernel against the cache), with the LongRoPE factor set of the final
     length N + decode (the long set at every length above 4096 - decode, as llama.cpp), then `--decode` greedy
     tokens through the C decode step. Decode tokens/s (both sides) leave out the first token (buffer binding,
     llama.cpp's graph rebuild for batch 1).
   Both sides are checked to have processed the whole prompt (llama.cpp's own prompt-token counter; pocketlm's
   cache length and factor set), and the last prompt position's logits of the two engines are compared (cosine
   and top-1: the same model computed twice; random weights make attention nearly uniform, so this is a sanity
   check of the weights and the pipeline, not a proof of the rotary factors).
3. `--profile` splits pocketlm's prefill time into the kernel matrix products, SDPA attention, the KV-cache
   store/read (f16 -> f32), and the rest (RoPE, norms, Python).
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


def prompt_ids(n: int, vocab: int = 32000, seed: int = 0) -> list[int]:
    import random
    r = random.Random(seed)
    return [1] + [r.randrange(100, vocab) for _ in range(n - 1)]


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
    n, ctx = a.length, a.length + a.decode
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
        t = time.perf_counter()
        for start in range(0, n, CHUNK):  # engine.generate.prefill's loop, with the final length's factor set
            logits = fast(ids[:, start:start + CHUNK], cache, last_only=True, rope_mode=mode)  # (1, 1, V)
        out["prompt_s"] = time.perf_counter() - t
        if cache.length != n or cache.rope_mode != mode:
            raise SystemExit(f"pocketlm prefilled {cache.length} tokens with {cache.rope_mode!r}, not {n} / {mode!r}")
        out["prompt_tokens"] = cache.length
        last = logits[0, -1].float()
        np.save(a.logits_out, last.numpy())
        if a.profile:
            out["profile_s"] = dict(timers.s)
            out["profile_s"]["other"] = out["prompt_s"] - sum(timers.s.values())
        tok = int(last.argmax())
        for i in range(a.decode):  # the first token binds the C step's buffers: timed apart
            if i == 1:
                t = time.perf_counter()
            tok = int(fast(torch.tensor([[tok]]), cache, last_only=True, rope_mode=mode)[0, -1].argmax())
        out["decode_s"] = time.perf_counter() - t
        out["final_length"] = cache.length
    out["rss_gb"] = rss_gb()
    return out


def worker_llamacpp(a) -> dict:
    import llama_cpp
    import numpy as np
    n, ctx = a.length, a.length + a.decode
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=ctx, n_batch=2048, n_ubatch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, flash_attn=a.fa == "on", verbose=False)
    out = {"engine": f"llama.cpp (fa {a.fa})", "version": llama_cpp.__version__, "n_ctx": llm.n_ctx(),
           "n_batch": llm.n_batch, "rope_mode": "long" if llm.n_ctx() > 4096 else "short"}
    vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,)).copy()

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t = time.perf_counter()
    llm.eval(prompt_ids(n))
    out["prompt_s"] = time.perf_counter() - t
    last = last_logits()
    np.save(a.logits_out, last)
    tok = int(np.argmax(last))
    for i in range(a.decode):  # the first token rebuilds llama.cpp's graph for batch 1: timed apart
        if i == 1:
            t = time.perf_counter()
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    out["decode_s"] = time.perf_counter() - t
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
    return json.loads(r.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--decode", type=int, default=8, help="greedy tokens decoded after each prompt (the first is "
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
    if max(lengths) + a.decode > config.max_position_embeddings:
        raise SystemExit(f"{max(lengths)} + {a.decode} tokens exceed the {config.max_position_embeddings}-token "
                         "context")
    a.threads = a.threads or kernels.default_threads()
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
            for i in range(a.repeats):
                for kind, fa in kinds:
                    logits = str(Path(scratch) / f"{kind}-{fa}-{n}-{i}.npy")
                    r = run_worker(kind, a, n, fa, logits)
                    r["logits_file"] = logits
                    r["load_avg_1m"] = os.getloadavg()[0]
                    runs[n].setdefault(r["engine"], []).append(r)
                    print(f"  {n} tokens, run {i + 1}, {r['engine']}: prompt {n / r['prompt_s']:.1f} tok/s, decode "
                          f"{(a.decode - 1) / r['decode_s']:.2f} tok/s (load {r['load_avg_1m']:.2f})", flush=True)
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
            rows[name] = {"prompt_tok_s": n / med(rs, "prompt_s"),
                          "decode_tok_s": (a.decode - 1) / med(rs, "decode_s"),
                          "rope_mode": rs[0]["rope_mode"], "prompt_tokens": rs[0]["prompt_tokens"],
                          "rss_gb": med(rs, "rss_gb")}
        entry = {"length": n, "pocketlm": rows.pop("pocketlm"), "llama_cpp": rows, "logits_check": checks[n]}
        if rows:
            best = max(rows, key=lambda k: rows[k]["prompt_tok_s"])
            entry["baseline"] = best
            entry["prompt_vs_llama_cpp"] = entry["pocketlm"]["prompt_tok_s"] / rows[best]["prompt_tok_s"]
            entry["decode_vs_llama_cpp"] = entry["pocketlm"]["decode_tok_s"] / max(
                r["decode_tok_s"] for r in rows.values())
        if a.profile:
            entry["pocketlm"]["profile_s"] = runs[n]["pocketlm"][0]["profile_s"]
        table.append(entry)

    print(f"\n{PRESET} shape, {a.layers} layer(s), random Q4_0 weights, {a.threads} threads, {a.decode} decoded "
          f"tokens after each prompt, median of {a.repeats}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    print(f"{'length':>7} {'engine':<20} {'prompt tok/s':>12} {'decode tok/s':>12} {'rope':>5} {'prompt x':>9} "
          f"{'decode x':>9}")
    for e in table:
        for name, r in [("pocketlm", e["pocketlm"])] + list(e["llama_cpp"].items()):
            px = f"{e['prompt_vs_llama_cpp']:.2f}x" if name == "pocketlm" and "baseline" in e else ""
            dx = f"{e['decode_vs_llama_cpp']:.2f}x" if name == "pocketlm" and "baseline" in e else ""
            print(f"{e['length']:>7} {name:<20} {r['prompt_tok_s']:>12.1f} {r['decode_tok_s']:>12.2f} "
                  f"{r['rope_mode']:>5} {px:>9} {dx:>9}")
        for name, c in e["logits_check"].items():
            print(f"{'':>7} logits vs {name}: cosine {c['cosine']:.4f}, top-1 same {c['top1_same']}, top-10 "
                  f"overlap {c['top10_overlap']}/10")
        if a.profile:
            p = e["pocketlm"]["profile_s"]
            print(f"{'':>7} pocketlm prefill: " + ", ".join(f"{k} {v:.2f} s" for k, v in p.items()))
    result = {"preset": PRESET, "layers": a.layers, "type": "Q4_0", "threads": a.threads, "decode": a.decode,
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
