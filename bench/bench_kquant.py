"""K-quant kernels (Q4_K_M / Q5_K_M files; also all-Q5_0 / Q5_1 / IQ4_NL files) against the reference path and
llama.cpp, same weights, same run.

    python bench/bench_kquant.py [--mix q4_k_m|q5_k_m|q5_0|q5_1|iq4_nl] [--preset phi-3-mini-4k] [--layers 2]
                                 [--prompt 64] [--decode 32] [--ref-decode 2] [--threads N] [--repeats 3]
                                 [--no-llama-cpp] [--out FILE.json]

1. Weights: the preset's width (phi-3-mini: hidden 3072, MLP 8192, vocab 32064) with `--layers` decoder layers,
   random codes in llama.cpp's Q4_K_M (Q5_K_M) mix: Q4_K (Q5_K) for token_embd, attn_qkv, attn_output, ffn_up
   (gate+up), Q6_K for ffn_down and output (the q5_0 / q5_1 / iq4_nl mixes: that type everywhere). Written once
   as a phi3 GGUF in $TMPDIR; every engine loads that file.
2. pocketlm kernels: `load_gguf` (every linear on the compiled kernels, asserted) + the C decode step
   (`engine.cpu.accelerate`, f16 KV cache): a `--prompt`-token prompt through `engine.generate.prefill`, then
   `--decode` greedy tokens; wall clock including Python.
3. pocketlm reference path: `load_gguf(backend="reference")` (dequantize + float matmul per call), the same
   prompt, `--ref-decode` tokens (it is slow).
4. llama.cpp (llama-cpp-python, when installed and not --no-llama-cpp): the same prompt in one eval, then
   `--decode` greedy tokens; wall clock including Python (llama-cpp-python), as for pocketlm. Greedy tokens are
   read from llama.cpp's C logits buffer (`llm.scores` is not filled without logits_all).
Every decoded token is timed alone: decode tokens/s = 1 / the median token time, and the table shows the share
of the threads' time spent waiting for a core (other processes; see `sched_s`: a loaded 2-core machine slows a
2-thread llama.cpp far more than pocketlm, so compare only low-wait runs, or run with --threads 1).
Kernels and llama.cpp alternate `--repeats` times (median reported), each in its own process; on an AVX512 CPU
the kernels also run with $POCKETLM_KERNEL_ISA=avx2 (the path of AVX2-only CPUs). Also reports the
roofline: bytes read per decoded token / measured read bandwidth. Prints a table, writes JSON (default
bench/results/bench_kquant_<mix>.json). On a shared machine other load moves every number: compare within one run.
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

ROOT = Path(__file__).resolve().parents[1]
MIXES = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q5_0": "Q5_0", "q5_1": "Q5_1", "iq4_nl": "IQ4_NL"}
"""--mix -> the main type (token_embd, attn_qkv, attn_output, ffn_up); ffn_down and output are DOWN's type."""
DOWN = {"q4_k_m": "Q6_K", "q5_k_m": "Q6_K"}
"""ffn_down and output of the K-quant mixes (llama.cpp's); the other mixes are one type throughout."""


def prompt_ids(n: int, vocab: int = 32000, seed: int = 0) -> list[int]:
    import random
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def sched_s() -> tuple[float, float]:
    """(CPU seconds, run-queue wait seconds) of this process's threads, summed (/proc/self/task/*/schedstat).
    The wait is time runnable without a core: CPU contention from other processes. It explains this bench's
    old llama.cpp figures (2.5-6.4 decode tokens/s): llama.cpp's threads spin at a barrier after every graph op,
    so with another process on one of 2 cores a 2-thread llama.cpp waits out that process's time slice at every
    op (about 230 ms per token against 8 ms idle, the wait equal to the token time), while it decoded the same
    file at 73-85 tokens/s on 1 thread. pocketlm's threads claim work chunks dynamically and degrade in
    proportion; compare only runs with low wait shares, or use --threads 1."""
    import glob
    cpu = wait = 0
    for f in glob.glob("/proc/self/task/*/schedstat"):
        try:
            fields = open(f).read().split()
            cpu, wait = cpu + int(fields[0]), wait + int(fields[1])
        except (OSError, IndexError, ValueError):  # a thread that exited meanwhile
            pass
    return cpu / 1e9, wait / 1e9


def timed_decode(step, tok: int, count: int, threads: int) -> dict:
    """`count` greedy tokens `step(tok) -> next tok`, each timed alone. decode_tok_s = 1 / the median token time
    (one preempted token does not move it); decode_wait_share = run-queue wait / (wall x threads)."""
    times, waits = [], []
    for _ in range(count):
        w, t = sched_s()[1], time.perf_counter()
        tok = step(tok)
        times.append(time.perf_counter() - t)
        waits.append(sched_s()[1] - w)
    return {"decode_s": sum(times), "decode_token_s": times, "decode_tok_s": 1.0 / statistics.median(times),
            "decode_wait_share": sum(waits) / (sum(times) * threads)}


# ----- workers (one process each) -----------------------------------------------------------------------------------

def worker_pocketlm(a, backend: str) -> dict:
    import torch

    from pocketlm.engine import cpu
    from pocketlm.engine.generate import prefill
    from pocketlm.quant import kernels
    from pocketlm.formats.gguf_model import load_gguf
    from pocketlm.quant.linear import QuantizedLinear
    kernels.set_threads(a.threads)
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    model = load_gguf(a.gguf, backend=backend)
    out = {"engine": f"pocketlm-{backend}", "load_s": time.perf_counter() - t, "isa": kernels.isa()}
    paths = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            paths.setdefault(m.type_name, set()).add(m.backend)
    out["paths"] = {k: sorted(v) for k, v in sorted(paths.items())}
    n_decode = a.decode if backend == "kernel" else a.ref_decode
    fast = cpu.accelerate(model, "f16")
    if backend == "kernel":
        assert all(p == ["kernel"] for p in out["paths"].values()), out["paths"]
        assert isinstance(fast, cpu.FastDecoder), "the model did not land on the C decode step"
    ids = prompt_ids(a.prompt)
    with torch.inference_mode():
        cache = fast.make_cache(1, a.prompt + n_decode + 8)
        t = time.perf_counter()
        logits = prefill(fast, cache, ids)
        out["prompt_s"] = time.perf_counter() - t
        if not torch.isfinite(logits).all():
            raise SystemExit("pocketlm's logits after the prompt are not all finite")
        tok = int(logits.argmax())
        out.update(timed_decode(lambda tok: int(fast(torch.tensor([[tok]]), cache, last_only=True)[0, -1].argmax()),
                                tok, n_decode, a.threads))
    out["prompt_tok_s"] = a.prompt / out["prompt_s"]
    return out


def worker_llamacpp(a) -> dict:
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=a.prompt + a.decode + 8, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, verbose=False)
    out = {"engine": "llama.cpp", "version": llama_cpp.__version__}
    ids = prompt_ids(a.prompt)
    vocab = llm.n_vocab()

    def last_logits():  # llm.scores is not filled without logits_all (it stayed zeros: argmax 0 every token)
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(last_logits()))
    out["prompt_s"] = time.perf_counter() - t
    if not np.isfinite(last_logits()).all():
        raise SystemExit("llama.cpp's logits after the prompt are not all finite")

    def step(tok: int) -> int:
        llm.eval([tok])
        return int(np.argmax(last_logits()))
    out.update(timed_decode(step, tok, a.decode, a.threads))  # wall clock with Python, as pocketlm's
    out["prompt_tok_s"] = a.prompt / out["prompt_s"]
    llm.close()
    return out


def run_worker(kind: str, a, isa: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--gguf", a.gguf, "--threads", str(a.threads), "--prompt",
           str(a.prompt), "--decode", str(a.decode), "--ref-decode", str(a.ref_decode)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if isa is not None:
        env["POCKETLM_KERNEL_ISA"] = isa
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="phi-3-mini-4k")
    p.add_argument("--mix", default="q4_k_m", choices=sorted(MIXES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--ref-decode", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--gguf", default=None)
    p.add_argument("--out", default=None, help="default: bench/results/bench_kquant_<mix>.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        out = worker_llamacpp(a) if a.worker == "llama.cpp" else worker_pocketlm(a, a.worker)
        print(json.dumps(out))
        return

    from pocketlm.config import preset
    from pocketlm.formats.gguf import GGUFFile
    from pocketlm.quant import kernels
    config = preset(a.preset).replace(num_hidden_layers=a.layers)
    a.threads = a.threads or kernels.default_threads()
    if a.gguf is None:
        a.gguf = str(Path(tempfile.gettempdir()) / f"pocketlm-bench-{a.preset}-{a.layers}l-{a.mix}.gguf")
    if not Path(a.gguf).exists():
        from pocketlm.quant.random_model import write_random_gguf
        write_random_gguf(config, Path(a.gguf), MIXES[a.mix], down_and_output=DOWN.get(a.mix))
    a.out = a.out or str(ROOT / "bench" / "results" / f"bench_kquant_{a.mix}.json")
    g = GGUFFile(a.gguf)
    # bytes read per decoded token: every matrix once except the embedding (one row)
    weight_bytes = sum(t.n_bytes for n, t in g.tensors.items() if n != "token_embd.weight")
    bw = kernels.read_bandwidth(1 << 30, reps=5, threads=a.threads)
    have_llama = not a.no_llama_cpp
    if have_llama:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            have_llama = False
    # the AVX2 path too where the native one is AVX512 (the AVX2-only CPUs users have)
    forced = ["avx2"] if kernels.isa() == "avx512-vnni" and "avx2" in kernels.supported_isas() else []
    runs: dict[str, list[dict]] = {"kernel": [], "llama.cpp": [], **{f"kernel-{i}": [] for i in forced}}
    for rep in range(a.repeats):  # alternate, the order too, so that drifting load hits all
        order = ["kernel"] + [f"kernel-{i}" for i in forced] + (["llama.cpp"] if have_llama else [])
        for key in (order if rep % 2 == 0 else order[::-1]):
            isa = key.split("-", 1)[1] if key.startswith("kernel-") else None
            runs[key].append(run_worker("kernel" if isa else key, a, isa=isa))
    ref = run_worker("reference", a)
    rows = {}
    named = [(f"pocketlm kernels ({kernels.isa()})", runs["kernel"])]
    named += [(f"pocketlm kernels ({i})", runs[f"kernel-{i}"]) for i in forced]
    for name, rs in (*named, ("llama.cpp", runs["llama.cpp"]), ("pocketlm reference", [ref])):
        if rs:
            rows[name] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                          "decode_wait_share": statistics.median(r["decode_wait_share"] for r in rs),
                          "prompt_tok_s": statistics.median(r["prompt_tok_s"] for r in rs), "runs": rs}
    roofline = bw * 1e9 / weight_bytes
    print(f"{a.mix.upper()}, {a.preset} width, {a.layers} layers, {weight_bytes / 1e6:.0f} MB read per token; "
          f"kernels isa: {kernels.isa()}; {a.threads} threads; {platform.processor() or platform.machine()}")
    print(f"read bandwidth {bw:.1f} GB/s -> roofline {roofline:.1f} tokens/s")
    print(f"{'engine':<30} {'decode tok/s':>13} {'prompt tok/s':>13} {'decode vs ref':>14} {'vs llama.cpp':>13} "
          f"{'of roofline':>12} {'wait':>5}")
    base = rows.get("llama.cpp")
    for name, r in rows.items():
        r["decode_vs_reference"] = r["decode_tok_s"] / rows["pocketlm reference"]["decode_tok_s"]
        r["decode_vs_llama_cpp"] = r["decode_tok_s"] / base["decode_tok_s"] if base else None
        r["prompt_vs_llama_cpp"] = r["prompt_tok_s"] / base["prompt_tok_s"] if base else None
        r["of_roofline"] = r["decode_tok_s"] / roofline
        vs = f"{r['decode_vs_llama_cpp']:.2f}x" if base else "-"
        print(f"{name:<30} {r['decode_tok_s']:>13.2f} {r['prompt_tok_s']:>13.1f} {r['decode_vs_reference']:>13.1f}x "
              f"{vs:>13} {r['of_roofline']:>11.0%} {r['decode_wait_share']:>5.0%}")
    print("wait: share of the decode threads' time spent waiting for a core (other load; see sched_s)")
    result = {"preset": a.preset, "layers": a.layers, "mix": a.mix,
              "types": MIXES[a.mix] + (f" + {DOWN[a.mix]} for ffn_down and output" if a.mix in DOWN else ""),
              "isa": kernels.isa(), "threads": a.threads, "prompt": a.prompt, "decode": a.decode,
              "ref_decode": a.ref_decode, "weight_bytes_per_token": weight_bytes, "read_bandwidth_gb_s": bw,
              "roofline_tok_s": roofline, "cpu": platform.processor() or platform.machine(), "engines": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
