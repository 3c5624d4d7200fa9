"""Multiple-choice scoring speed: shared-prefix batching (PocketLMBackend.loglikelihood) vs one full forward per
choice (the baseline, measured in the same run). Prints a table and writes JSON.

    python bench/bench_eval_loglikelihood.py [--preset micro] [--items 8] [--out bench/eval_loglikelihood.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import pocketlm
from pocketlm.eval.backends import PocketLMBackend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--context-words", type=int, default=300)
    ap.add_argument("--out", default="bench/eval_loglikelihood.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    b = PocketLMBackend(pocketlm.load(a.preset), pocketlm.Tokenizer.default())
    words = "the quick brown fox jumps over a lazy dog while seven tired cats watch from the old wall".split()
    items = []
    for i in range(a.items):  # a HellaSwag-shaped item: long few-shot context, 4 endings of ~15 words
        ctx = " ".join(words[(i + j) % len(words)] for j in range(a.context_words)) + "."
        items.append([(ctx, " " + " ".join(words[(i + k + j) % len(words)] for j in range(15))) for k in range(4)])
    b.loglikelihood(items[0])  # warm-up
    t0 = time.perf_counter()
    shared = [b.loglikelihood(reqs) for reqs in items]
    t_shared = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [[b._single(*b.encode_pair(c, x)) for c, x in reqs] for reqs in items]
    t_single = time.perf_counter() - t0
    diff = max(abs(s[0] - r[0]) for sh, si in zip(shared, single) for s, r in zip(sh, si))
    rows = {"preset": a.preset, "items": a.items, "choices_per_item": 4,
            "context_tokens": len(b.encode_pair(*items[0][0])[0]),
            "baseline_per_choice_s": round(t_single, 3), "shared_prefix_s": round(t_shared, 3),
            "speedup": round(t_single / t_shared, 2), "max_abs_loglik_diff": diff, "threads": torch.get_num_threads()}
    print(f"{'method':<26}{'seconds':>10}{'ratio':>8}")
    print(f"{'one forward per choice':<26}{t_single:>10.3f}{1.0:>8.2f}")
    print(f"{'shared prefix (pocketlm)':<26}{t_shared:>10.3f}{t_single / t_shared:>8.2f}")
    print(f"max |loglik difference| = {diff:.2e}")
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
