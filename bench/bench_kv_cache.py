"""KV cache types: perplexity with f32 / int8 / q8_0 / q4_0 caches against the f16 cache (the baseline), same run.

    python bench/bench_kv_cache.py [--model PATH] [--lengths 256 1024] [--windows 3] [--text FILE] [--chunk 64]
                                   [--out bench/results/bench_kv_cache.json]

Model: the embedded default model (pocketlm's trained `nano` model, 4 layers, head_dim 64, context 1024), in
float32 with a PyTorch `KVCache` of each type (`model.kv_cache_type`, pocketlm.kvcache). Text: the GPL-3 text
Debian ships (/usr/share/common-licenses/GPL-3; else README.md), tokenized once and cut into `--windows`
non-overlapping windows of each length. Each window runs through the cache in chunks of `--chunk` tokens with
logits for every position, so every query (also within its own chunk) attends over keys and values read back
from the quantized cache, as decoding does. Reported: perplexity, its change against the f16 cache, the fraction
of positions whose top-1 token equals the f16 cache's, and the cache's bytes at that length. Writes JSON and
prints a table. The machine is shared: the times are indicative only (perplexities are exact for a given torch
build).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["f16", "f32", "int8", "q8_0", "q4_0"]  # f16 first: the baseline


GPL = Path("/usr/share/common-licenses/GPL-3")


def text_tokens(tok, path: str | None) -> tuple[list[int], str]:
    """Plain English prose close to the default model's training domain (Debian documentation): the GPL-3 text
    Debian ships, else this repository's README.md."""
    p = Path(path) if path else (GPL if GPL.exists() else ROOT / "README.md")
    return tok.encode(p.read_text(encoding="utf-8")), str(p)


@torch.inference_mode()
def window_nll(model, ids: list[int], chunk: int) -> tuple[float, torch.Tensor]:
    """Summed negative log-likelihood of ids[1:] and the top-1 predictions, through the model's cache type."""
    cache = model.make_cache(1, len(ids))
    x = torch.tensor([ids])
    logits = torch.cat([model(x[:, s:s + chunk], cache) for s in range(0, len(ids), chunk)], dim=1)[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.float(), x[0, 1:], reduction="sum").item()
    return nll, logits.argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--text", default=None,
                    help="text file (default: /usr/share/common-licenses/GPL-3, else README.md)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_kv_cache.json"))
    a = ap.parse_args()

    import pocketlm
    from pocketlm.api import default_model_path
    from pocketlm.kvcache import kv_cache_bytes
    path = a.model or str(default_model_path())
    model = pocketlm.load(path, dtype="float32")
    tok = pocketlm.Tokenizer.from_pretrained(Path(path)) if Path(path).is_dir() else pocketlm.Tokenizer.default()
    ids, text_name = text_tokens(tok, a.text)
    rows = []
    for L in a.lengths:
        if L > model.config.max_position_embeddings:
            raise SystemExit(f"--lengths {L} exceeds the model's context {model.config.max_position_embeddings}")
        wins = [ids[i * L:(i + 1) * L] for i in range(a.windows)]
        if len(wins[-1]) < L:
            raise SystemExit(f"the text holds {len(ids)} tokens, fewer than {a.windows} windows of {L}")
        base_top = None
        base_ppl = None
        for t in TYPES:
            model.kv_cache_type = t
            t0 = time.perf_counter()
            total, tops = 0.0, []
            for w in wins:
                nll, top = window_nll(model, w, a.chunk)
                total += nll
                tops.append(top)
            secs = time.perf_counter() - t0
            ppl = math.exp(total / (a.windows * (L - 1)))
            top = torch.cat(tops)
            if t == "f16":
                base_top, base_ppl = top, ppl
            rows.append({"length": L, "kv_cache": t, "perplexity": ppl, "ppl_vs_f16": ppl / base_ppl,
                         "top1_agree_f16": (top == base_top).float().mean().item(),
                         "cache_bytes": kv_cache_bytes(model.config, L, t),
                         "cache_vs_f16": kv_cache_bytes(model.config, L, t) / kv_cache_bytes(model.config, L, "f16"),
                         "seconds": secs})
    model.kv_cache_type = None
    print(f"{'length':>6} {'cache':6} {'ppl':>9} {'vs f16':>8} {'top-1 = f16':>11} {'bytes vs f16':>12} {'s':>6}")
    for r in rows:
        print(f"{r['length']:6d} {r['kv_cache']:6} {r['perplexity']:9.3f} {r['ppl_vs_f16']:8.4f} "
              f"{r['top1_agree_f16']:11.4f} {r['cache_vs_f16']:12.3f} {r['seconds']:6.1f}")
    out = {"model": "default model (nano, 11.6M, float32)" if a.model is None else a.model,
"text": text_name, "text_tokens": len(ids), "windows": a.windows, "chunk": a.chunk,
           "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
           "load_average": os.getloadavg(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
