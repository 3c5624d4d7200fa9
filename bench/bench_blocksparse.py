"""Phi-3-small block-sparse attention on the CPU: the block-skipping kernel against dense attention, same inputs.

    python bench/bench_blocksparse.py [--heads 4] [--kv-heads 1] [--head-dim 64] [--lengths 1024,2048,4096,8192,16384]
                                      [--locals 4,8,16,32] [--local-length 4096] [--masked-max 8192]
                                      [--repeats 2] [--threads 1]
                                      [--out bench/results/bench_blocksparse.json]

The layout is the released one (blocks of 64, vertical stride 8, per-head patterns) at a smaller width. Two
sweeps, one attention call (prefill of the whole sequence) per measurement, median of --repeats:
1. sequence length T (16 local blocks): `blocksparse_attention_blocked` (reads only the visible key blocks) vs
   causal dense SDPA (the same q/k/v, all T^2/2 pairs) vs the masked SDPA (the block-sparse mask on a dense SDPA:
   the reference path). The "visible blocks" column counts (query block, key block, head) triples the layout
   admits; "causal blocks" what dense causal attention touches. Time per visible block stays roughly flat for the
   blocked kernel while dense time per block is flat against causal blocks, i.e. grows with T^2.
2. number of local blocks at fixed T: the blocked kernel's time follows the visible blocks.
Prints tables and writes JSON. The machine is shared with other jobs: compare within one run (ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pocketlm.config_small import Phi3SmallConfig
from pocketlm.model_small import block_layout, blocksparse_attention_blocked, blocksparse_attention_masked


def config(heads: int, kv: int, head_dim: int, local: int, length: int) -> Phi3SmallConfig:
    return Phi3SmallConfig(vocab_size=1024, bos_token_id=0, eos_token_id=0, hidden_size=heads * head_dim,
                           intermediate_size=64, num_hidden_layers=1, num_attention_heads=heads,
                           num_key_value_heads=kv, max_position_embeddings=max(length, 8192),
                           blocksparse_num_local_blocks=local, torch_dtype="float32")


def visible_blocks(c: Phi3SmallConfig, length: int) -> int:
    nb = -(-length // c.blocksparse_block_size)
    return int(block_layout(c, nb).sum())


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(c: Phi3SmallConfig, length: int, repeats: int, *, dense: bool, masked: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    H, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = torch.randn(1, H, length, hd, generator=g)
    k, v = torch.randn(1, kv, length, hd, generator=g), torch.randn(1, kv, length, hd, generator=g)
    nb = -(-length // c.blocksparse_block_size)
    row = {"T": length, "local_blocks": c.blocksparse_num_local_blocks, "visible_blocks": visible_blocks(c, length),
           "causal_blocks": H * nb * (nb + 1) // 2}
    with torch.no_grad():
        out = blocksparse_attention_blocked(q, k, v, c, 0)
        row["blocked_s"] = timed(lambda: blocksparse_attention_blocked(q, k, v, c, 0), repeats)
        if dense:
            row["dense_causal_s"] = timed(lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=c.attention_scale, enable_gqa=kv != H), repeats)
        if dense and masked:  # materializes (H, T, T) scores: skipped above --masked-max
            pos = torch.arange(length)[None]
            row["masked_s"] = timed(lambda: blocksparse_attention_masked(q, k, v, c, pos, pos), repeats)
            ref = blocksparse_attention_masked(q, k, v, c, pos, pos)
            row["max_abs_diff_vs_masked"] = float((out - ref).abs().max())
    row["blocked_us_per_visible_block"] = 1e6 * row["blocked_s"] / row["visible_blocks"]
    if dense:
        row["dense_us_per_causal_block"] = 1e6 * row["dense_causal_s"] / row["causal_blocks"]
        row["dense_over_blocked"] = row["dense_causal_s"] / row["blocked_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--locals", default="4,8,16,32")
    p.add_argument("--local-length", type=int, default=4096)
    p.add_argument("--masked-max", type=int, default=8192, help="longest T for the masked SDPA (memory)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_blocksparse.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows_t = []
    print(f"1) sequence length, 16 local blocks, {a.heads} heads / {a.kv_heads} kv x {a.head_dim}, block 64, "
          f"stride 8, {a.threads} thread(s), load average {load}")
    print(f"{'T':>6} {'visible':>8} {'causal':>8} {'blocked s':>10} {'dense s':>9} {'masked s':>9} "
          f"{'us/vis blk':>10} {'us/causal blk':>13} {'dense/blocked':>13}")
    for length in map(int, a.lengths.split(",")):
        r = measure(config(a.heads, a.kv_heads, a.head_dim, 16, length), length, a.repeats, dense=True,
                    masked=length <= a.masked_max)
        rows_t.append(r)
        masked = f"{r['masked_s']:>9.3f}" if "masked_s" in r else f"{'-':>9}"
        print(f"{r['T']:>6} {r['visible_blocks']:>8} {r['causal_blocks']:>8} {r['blocked_s']:>10.3f} "
              f"{r['dense_causal_s']:>9.3f} {masked} {r['blocked_us_per_visible_block']:>10.1f} "
              f"{r['dense_us_per_causal_block']:>13.1f} {r['dense_over_blocked']:>13.2f}")
    rows_l = []
    print(f"\n2) local blocks at T = {a.local_length}")
    print(f"{'local':>6} {'visible':>8} {'blocked s':>10} {'us/vis blk':>10}")
    for local in map(int, a.locals.split(",")):
        r = measure(config(a.heads, a.kv_heads, a.head_dim, local, a.local_length), a.local_length, a.repeats,
                    dense=False)
        rows_l.append(r)
        print(f"{local:>6} {r['visible_blocks']:>8} {r['blocked_s']:>10.3f} {r['blocked_us_per_visible_block']:>10.1f}")
    first, last = rows_t[0], rows_t[-1]
    summary = {
        "T_ratio": last["T"] / first["T"],
        "visible_blocks_ratio": last["visible_blocks"] / first["visible_blocks"],
        "causal_blocks_ratio": last["causal_blocks"] / first["causal_blocks"],
        "blocked_time_ratio": last["blocked_s"] / first["blocked_s"],
        "dense_time_ratio": last["dense_causal_s"] / first["dense_causal_s"],
    }
    print(f"\nfrom T={first['T']} to T={last['T']}: visible blocks x{summary['visible_blocks_ratio']:.1f}, "
          f"blocked time x{summary['blocked_time_ratio']:.1f}; causal blocks x{summary['causal_blocks_ratio']:.1f}, "
          f"dense time x{summary['dense_time_ratio']:.1f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "machine": platform.processor() or platform.machine(),
                               "load_average_1min": load, "torch": torch.__version__, "by_length": rows_t,
                               "by_local_blocks": rows_l, "summary": summary}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
