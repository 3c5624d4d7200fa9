"""LongRoPE factor search at small scale: the default model (trained on 256-token rows) extended to 4x, same run.

    python bench/bench_longrope.py [--target 1024] [--original 256] [--population 8] [--generations 4]
                                   [--out bench/results/bench_longrope.json]

Model: the embedded default model (pocketlm's `nano`, pretrained on 256-token rows; its config allows 1024
positions), float32. Text: the GPL-3 text Debian ships (else README.md's first third: longctx_windows.py), cut
into windows of `--target` tokens: the first two are the search's held-out set, the rest the test set. Schemes, all with LongRoPE's magnitude
sqrt(1 + ln s / ln original) except "none": plain RoPE (no scaling: positions past 256 are extrapolated), PI,
NTK-aware, YaRN-style by-parts, and the factors `pocketlm.longrope_search.search` finds (its initial population
holds PI/NTK/YaRN, so on the search set it is never worse). Reported: test-set perplexity overall and by position
bucket; no fine-tuning (the paper's step 2 is not part of this bench). Writes JSON (with the searched factors
in config.json's `rope_scaling` layout) and a PNG of perplexity by position.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from longctx_windows import ROOT, nll_by_position, test_and_train_text, windows  # bench/: shared with the fine-tune


def nll_under(model, test: list[list[int]], config) -> torch.Tensor:
    """Mean NLL at each position 1..T-1 over the test windows, under `config`'s rotary setting."""
    from pocketlm.model import RotaryEmbedding
    saved = model.config, model.rotary_emb
    try:
        model.config, model.rotary_emb = config, RotaryEmbedding(config)
        return nll_by_position(model, test)
    finally:
        model.config, model.rotary_emb = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model trained on --original positions (default: the embedded default model, "
                                     "whose distillation rows were 256 tokens; its teacher saw 8,192)")
    ap.add_argument("--target", type=int, default=1024)
    ap.add_argument("--original", type=int, default=256)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--bucket", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_longrope.json"))
    a = ap.parse_args()

    import pocketlm
    from pocketlm.api import default_model_path
    from pocketlm.longrope_search import extended_config, ntk_factors, pi_factors, search, yarn_factors
    path = a.model or default_model_path()
    model = pocketlm.load(str(path), dtype="float32").eval()
    tok = pocketlm.Tokenizer.from_pretrained(path)
    ids = tok.encode(test_and_train_text()[0])
    T = a.target
    cut = windows(ids, T)
    if len(cut) < 3:
        raise SystemExit(f"the text holds {len(ids)} tokens: fewer than 3 windows of {T}")
    held_out, test = cut[:2], cut[2:]
    base = model.config.replace(max_position_embeddings=a.original)  # the model as trained: 256 positions
    model.config = base
    t0 = time.perf_counter()
    res = search(model, held_out, T, original=a.original, population=a.population, generations=a.generations,
                 seed=0)
    search_s = time.perf_counter() - t0
    n = base.rotary_dim // 2
    s = T / a.original
    schemes = {"none": base.replace(max_position_embeddings=T),
               "pi": extended_config(base, pi_factors(n, s), T, a.original),
               "ntk": extended_config(base, ntk_factors(n, s), T, a.original),
               "yarn": extended_config(base, yarn_factors(n, s), T, a.original),
               "searched": extended_config(base, res.long_factor, T, a.original)}
    rows, curves = {}, {}
    for name, cfg in schemes.items():
        nll = nll_under(model, test, cfg)  # (T-1,)
        buckets = {f"{i}-{min(i + a.bucket, T) - 1}": math.exp(nll[max(i - 1, 0):i + a.bucket - 1].mean().item())
                   for i in range(0, T, a.bucket)}
        rows[name] = {"perplexity": math.exp(nll.mean().item()),
                      "perplexity_within_original": math.exp(nll[:a.original - 1].mean().item()),
                      "perplexity_beyond_original": math.exp(nll[a.original - 1:].mean().item()),
                      "by_position": buckets}
        curves[name] = list(buckets.values())
    hdr = f"{'scheme':10} {'ppl':>9} {'<= ' + str(a.original):>9} {'> ' + str(a.original):>9}"
    print(hdr)
    for name, r in rows.items():
        print(f"{name:10} {r['perplexity']:9.2f} {r['perplexity_within_original']:9.2f} "
              f"{r['perplexity_beyond_original']:9.2f}")
    print(f"search: {res.evaluated} candidates in {search_s:.0f} s; held-out ppl {res.perplexity:.2f}, "
          f"baselines {', '.join(f'{k} {v:.2f}' for k, v in res.baselines.items())}")
    out = {"model": "default model (nano, trained on 256-token rows), float32", "target": T, "original": a.original,
           "text_tokens": len(ids), "search_windows": len(held_out), "test_windows": len(test),
           "population": a.population, "generations": a.generations, "search_seconds": search_s,
           "search": {"perplexity": res.perplexity, "baselines": res.baselines, "history": res.history,
                      "evaluated": res.evaluated},
           "rope_scaling": {"long_factor": res.long_factor, "short_factor": [1.0] * n, "type": "longrope"},
           "original_max_position_embeddings": a.original, "max_position_embeddings": T, "test": rows,
           "load_average": os.getloadavg()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [i + a.bucket / 2 for i in range(0, T, a.bucket)]
        for name, ys in curves.items():
            ax.plot(xs, ys, marker="o", label=name)
        ax.axvline(a.original, color="grey", linestyle=":")
        ax.set_xlabel("position")
        ax.set_ylabel("perplexity (test windows)")
        ax.set_yscale("log")
        ax.legend()
        png = Path(a.out).with_suffix(".png")
        fig.savefig(png, dpi=110, bbox_inches="tight")
        print(f"wrote {png}")
    except ImportError:
        pass
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
