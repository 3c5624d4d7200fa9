"""One-token matrix-vector products on the kernels (pl_gemm at T = 1) against the measured read bandwidth.

    python bench/bench_matvec.py [--shapes phi3|smollm2] [--threads N] [--copies 4] [--reps 5] [--out FILE.json]

The quickest loop for decode speed: the matrices of one decoder layer (phi3: phi-3-mini's Q4_K qkv 9216x3072,
o 3072x3072, gate_up 16384x3072 and Q6_K down 3072x8192; smollm2: SmolLM2-135M's Q8_0 960x576, 576x576,
3072x576 and Q6_K 576x1536, plus its Q8_0 lm_head 49152x576), `--copies` copies of each (at least 256 MiB a pass,
far more than the caches hold), random tile bytes with sane f16 scales. Each matrix is run with activations already
quantized (the product alone, as pl_decode_step calls it, through ctypes: a few microseconds per call), best of
`--reps` passes; GB/s = weight bytes / time, and the fraction of `kernels.read_bandwidth` (the roofline's
denominator) measured in the same run. Each pass runs the K-quant kernels with their software prefetch
(`kernels.set_prefetch`, the default distance) and without it (0), alternating: the speedup column. Prints a table (ISA, load average) and writes JSON (default
$TMPDIR/bench_matvec.json; bench/results/ when named with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pocketlm.quant import kernels

SHAPES = {
    "phi3": [("qkv", "Q4_K", 9216, 3072), ("o", "Q4_K", 3072, 3072), ("gate_up", "Q4_K", 16384, 3072),
             ("down", "Q6_K", 3072, 8192)],
    "smollm2": [("qkv", "Q8_0", 960, 576), ("o", "Q8_0", 576, 576), ("gate_up", "Q8_0", 3072, 576),
                ("down", "Q6_K", 576, 1536), ("lm_head", "Q8_0", 49152, 576)],
}
SCALE_OFF = {"Q4_K": (2304, 64), "Q6_K": (3328, 32), "Q8_0": (512, 32), "Q5_K": (2816, 64), "Q4_1": (256, 64),
             "Q4_0": (256, 32), "Q5_0": (320, 32), "Q5_1": (320, 64)}
"""type -> (byte offset, bytes) of the f16 scales in a tile block: set to 0.01 so no value is a NaN/denormal."""


def random_tiles(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    bsz = kernels.TILE_BLOCK_BYTES[type_name]
    nblocks = -(-rows // kernels.TILE) * (cols // kernels.BLOCK_COLS[type_name])
    w = rng.integers(0, 256, size=(nblocks, bsz), dtype=np.uint8)
    off, n = SCALE_OFF[type_name]
    w[:, off:off + n] = np.frombuffer(np.full(n // 2, 0.01, np.float16).tobytes(), np.uint8)
    return torch.from_numpy(w.reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="phi3", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    threads = a.threads or kernels.default_threads()
    kernels.set_threads(threads)
    lib = kernels._load()
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    bw = kernels.read_bandwidth(1 << 30, 5, threads)
    default_pf = kernels.get_prefetch()
    dists = (0, default_pf)
    rows_out = []
    for name, type_name, rows, cols in SHAPES[a.shapes]:
        one = random_tiles(type_name, rows, cols, rng)
        copies = max(a.copies, -(-(256 << 20) // one.numel()))  # >= 256 MiB a pass: past the caches
        mats = [one] + [random_tiles(type_name, rows, cols, rng) for _ in range(copies - 1)]
        x = torch.randn(1, cols)
        if type_name in kernels.K_TYPES:
            qa, da, sa_i = kernels.quantize_activations_k(x)
            sa_f = da
        else:
            qa, da, sa_i, sa_f = kernels.quantize_activations(x)
        tiles = -(-rows // kernels.TILE)
        y = torch.empty(1, tiles * kernels.TILE)
        args = (kernels.KINDS[type_name], tiles, cols, qa.data_ptr(), da.data_ptr(), sa_i.data_ptr(),
                sa_f.data_ptr(), 1, y.data_ptr(), tiles * kernels.TILE, 0)
        best = {d: float("inf") for d in dists}
        for r in range(a.reps + 1):  # the first pass warms up; the prefetch settings alternate
            for d in dists:
                kernels.set_prefetch(d)
                t = time.perf_counter()
                for m in mats:
                    lib.pl_gemm(args[0], m.data_ptr(), *args[1:])
                if r:
                    best[d] = min(best[d], (time.perf_counter() - t) / copies)
        kernels.set_prefetch(default_pf)
        nbytes = mats[0].numel()
        gb_s = nbytes / best[default_pf] / 1e9
        rows_out.append({"matrix": name, "type": type_name, "rows": rows, "cols": cols, "bytes": nbytes,
                         "us": best[default_pf] * 1e6, "gb_s": gb_s, "of_bandwidth": gb_s / bw,
                         "us_no_prefetch": best[0] * 1e6, "gb_s_no_prefetch": nbytes / best[0] / 1e9})
        del mats
    total_b = sum(r["bytes"] for r in rows_out)
    total_s = sum(r["us"] for r in rows_out) / 1e6
    load_after = os.getloadavg()
    print(f"matvec T=1, {a.shapes}, {threads} threads, isa {kernels.isa()}, read bandwidth {bw:.1f} GB/s, "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {platform.processor()}")
    total_s0 = sum(r["us_no_prefetch"] for r in rows_out) / 1e6
    print(f"K-quant software prefetch {default_pf} bytes ahead, against none (pl_set_prefetch(0)), alternating")
    print(f"{'matrix':<8} {'type':<5} {'shape':>12} {'MB':>7} {'us':>8} {'GB/s':>6} {'of bw':>6} | "
          f"{'no prefetch':>11} {'GB/s':>6} {'speedup':>7}")
    for r in rows_out:
        print(f"{r['matrix']:<8} {r['type']:<5} {r['rows']:>6}x{r['cols']:<5} {r['bytes'] / 1e6:>7.2f} "
              f"{r['us']:>8.1f} {r['gb_s']:>6.1f} {100 * r['of_bandwidth']:>5.0f}% | {r['us_no_prefetch']:>11.1f} "
              f"{r['gb_s_no_prefetch']:>6.1f} {r['us_no_prefetch'] / r['us']:>6.2f}x")
    print(f"{'all':<8} {'':<5} {'':>12} {total_b / 1e6:>7.2f} {total_s * 1e6:>8.1f} {total_b / total_s / 1e9:>6.1f} "
          f"{100 * total_b / total_s / 1e9 / bw:>5.0f}% | {total_s0 * 1e6:>11.1f} {total_b / total_s0 / 1e9:>6.1f} "
          f"{total_s0 / total_s:>6.2f}x")
    out = a.out or str(Path(tempfile.gettempdir()) / "bench_matvec.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"shapes": a.shapes, "threads": threads, "isa": kernels.isa(),
                                     "prefetch_bytes": default_pf, "read_bandwidth_gb_s": bw,
                                     "loadavg": [load_before, load_after], "rows": rows_out,
                                     "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
