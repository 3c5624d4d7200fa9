"""KV cache types: perplexity with f32 / int8 / q8_0 / q4_0 caches against the f16 cache (the baseline), same run.

    python bench/bench_kv_cache.py [--model PATH] [--lengths 256 1024 | --lengths 4096,16384] [--windows 3 | 4,1]
                                   [--text FILE|pydoc] [--chunk 64] [--extend none|ntk|pi] [--types f16,q4_0]
                                   [--in-process] [--out bench/results/bench_kv_cache.json]

Model: by default the embedded default model (pocketlm's trained `nano` model, 4 layers, head_dim 64, context
1024), in float32; `--model` takes any checkpoint folder or `.gguf` file (its own tokenizer), e.g. SmolLM2-135M
(llama architecture, context 8192, GQA 9/3 heads), whose weights stay as stored (a Q4_1 GGUF runs on the CPU
kernels). Every cache type uses a PyTorch `KVCache` of that type (`model.kv_cache_type`, pocketlm.kvcache).

Text: the GPL-3 text Debian ships (/usr/share/common-licenses/GPL-3; else README.md), or `--text pydoc`: the
help topics of the Python language reference that every CPython ships (`pydoc_data.topics`, 79 topics, ~465,000
characters of English technical prose with code examples, joined in key order), or any UTF-8 file. It is
tokenized once and cut into `--windows` non-overlapping windows of each length (one count for every length, or
one per length: `--windows 4,1` gives 4 x 4096 and 1 x 16384 tokens). Each window runs through the cache in
chunks of `--chunk` tokens, the rope mode of the whole window forced on every chunk (as a chunked prefill does),
so every query (also within its own chunk: its keys are written to the cache first) attends over keys and values
read back from the quantized cache, as decoding does; the chunk size changes cost, not what is quantized.

Lengths beyond the model's context need `--extend`: "ntk" is NTK-aware scaling (theta x s^(d/(d-2)), s =
length / context, as per-frequency LongRoPE factors s^(2i/(d-2)), magnitude 1), "pi" linear position
interpolation (every frequency / s, magnitude 1); no fine-tuning. Lengths within the context use the model as it is.

Reported per length and type: perplexity, its ratio to the f16 cache's, the fraction of positions whose top-1 token
equals the f16 cache's, the cache's exact bytes, and (unless `--in-process`) the peak resident memory of a process
that loads the model and runs only that type at that length (`ru_maxrss`, beside the RSS right after loading).
Writes JSON and prints a table. The machine is shared: times are indicative only (perplexities are exact for a
given torch build).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["f16", "f32", "int8", "q8_0", "q4_0"]  # f16 first: the baseline
EXTENSIONS = ("none", "ntk", "pi")

GPL = Path("/usr/share/common-licenses/GPL-3")


def read_text(path: str | None) -> tuple[str, str]:
    """(text, its name): `pydoc` = CPython's pydoc_data.topics joined in key order; a file; default the GPL-3
    Debian ships (plain English prose close to the default model's training domain), else this README.md."""
    if path == "pydoc":
        import pydoc_data.topics as topics
        return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)), "pydoc_data.topics (CPython " \
            f"{platform.python_version()}, {len(topics.topics)} topics)"
    p = Path(path) if path else (GPL if GPL.exists() else ROOT / "README.md")
    return p.read_text(encoding="utf-8"), str(p)


def text_tokens(tok, path: str | None) -> tuple[list[int], str]:
    text, name = read_text(path)
    return tok.encode(text), name


def load_model(path: str | None):
    """(model, tokenizer): the default model in float32, or `path` (a folder or .gguf, weights as stored)."""
    import pocketlm
    from pocketlm.api import default_model_path
    p = Path(path) if path else default_model_path()
    model = pocketlm.load(str(p), dtype="float32").eval()
    tok = pocketlm.Tokenizer.from_pretrained(p) if p.is_dir() or p.suffix == ".gguf" else pocketlm.Tokenizer.default()
    return model, tok


def extend(model, length: int, method: str) -> dict | None:
    """Give `model` a context of `length` when it is longer than its own (see the module docstring); returns what
    was done (None: the model as it is)."""
    from pocketlm.config import RopeScaling
    from pocketlm.longrope_search import ntk_factors, pi_factors
    from pocketlm.model import RotaryEmbedding
    c = model.config
    if length <= c.max_position_embeddings:
        return None
    if method == "none":
        raise SystemExit(f"--lengths {length} exceeds the model's context {c.max_position_embeddings} "
                         "(give --extend ntk or pi)")
    if c.rope_scaling is not None:
        raise SystemExit(f"--extend {method}: the model already has LongRoPE factors; give lengths within its "
                         f"context {c.max_position_embeddings}")
    original, n = c.max_position_embeddings, c.rotary_dim // 2
    s = length / original
    factors = ntk_factors(n, s) if method == "ntk" else pi_factors(n, s)
    model.config = c.replace(max_position_embeddings=length, original_max_position_embeddings=original,
                             rope_scaling=RopeScaling(short_factor=(1.0,) * n, long_factor=tuple(factors),
                                                      attention_factor=1.0), longrope_policy="dynamic")
    model.rotary_emb = RotaryEmbedding(model.config).to(model.lm_head.weight.device)
    return {"method": method, "original": original, "scale": s, "attention_factor": 1.0,
            "effective_rope_theta": c.rope_theta * s ** (2 * n / (2 * n - 2)) if method == "ntk" else None,
            "long_factor_first_last": [factors[0], factors[-1]]}


@torch.inference_mode()
def window_nll(model, ids: list[int], chunk: int) -> tuple[float, torch.Tensor]:
    """Summed negative log-likelihood of ids[1:] and the top-1 predictions (len(ids) - 1,), through the model's
    cache type, chunk by chunk (only one chunk's logits exist at a time)."""
    cache = model.make_cache(1, len(ids))
    mode = model.rope_mode_for(len(ids))  # every chunk with the whole window's factor set, as a chunked prefill
    x = torch.tensor([ids])
    nll, tops = 0.0, []
    for s in range(0, len(ids), chunk):
        logits = model(x[:, s:s + chunk], cache, rope_mode=mode)[0]  # (c, vocab)
        target = x[0, s + 1:s + chunk + 1]  # (c or c - 1,): the window's last position predicts nothing
        logits = logits[:len(target)].float()
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        tops.append(logits.argmax(-1))
    return nll, torch.cat(tops)


def windows_of(ids: list[int], length: int, count: int) -> list[list[int]]:
    wins = [ids[i * length:(i + 1) * length] for i in range(count)]
    if len(wins[-1]) < length:
        raise SystemExit(f"the text holds {len(ids)} tokens, fewer than {count} windows of {length}")
    return wins


def run_type(model, wins: list[list[int]], kv_type: str, chunk: int) -> tuple[float, int, torch.Tensor, float]:
    """(summed NLL, scored tokens, top-1 predictions, seconds) of the windows with cache type `kv_type`."""
    model.kv_cache_type = kv_type
    t0 = time.perf_counter()
    total, n, tops = 0.0, 0, []
    for w in wins:
        nll, top = window_nll(model, w, chunk)
        total, n = total + nll, n + len(w) - 1
        tops.append(top)
    model.kv_cache_type = None
    return total, n, torch.cat(tops), time.perf_counter() - t0


def rss_mb() -> float:
    """Resident memory now (MiB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(a) -> None:
    """One (length, type) in this process: writes DIR/L-TYPE.json (+ .npy top-1) with the peak RSS."""
    model, tok = load_model(a.model)
    ids, _ = text_tokens(tok, a.text)
    L, t = a.worker_length, a.worker_type
    ext = extend(model, L, a.extend)
    rss_loaded = rss_mb()
    total, n, top, secs = run_type(model, windows_of(ids, L, a.worker_windows), t, a.chunk)
    out = Path(a.worker_dir)
    np.save(out / f"{L}-{t}.npy", top.numpy().astype(np.int32))
    (out / f"{L}-{t}.json").write_text(json.dumps({
        "nll": total, "tokens": n, "seconds": secs, "extension": ext, "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def parse_ints(values: list[str], flag: str, least: int) -> list[int]:
    """`--lengths 256 1024` or `--lengths 4096,16384`: integers >= least."""
    try:
        out = [int(v) for item in values for v in item.split(",") if v]
    except ValueError:
        raise SystemExit(f"{flag}: expected integers, got {' '.join(values)!r}") from None
    if not out or min(out) < least:
        raise SystemExit(f"{flag}: expected integers >= {least}, got {' '.join(values)!r}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: the embedded default model)")
    ap.add_argument("--lengths", nargs="+", default=["256", "1024"], help="window lengths (spaces or commas)")
    ap.add_argument("--windows", default="3", help="windows per length: one count, or one per length (4,1)")
    ap.add_argument("--text", default=None,
                    help="text file, or 'pydoc' (default: /usr/share/common-licenses/GPL-3, else README.md)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--extend", choices=EXTENSIONS, default="none",
                    help="context extension for lengths beyond the model's context")
    ap.add_argument("--types", default=",".join(TYPES), help="cache types (f16, the baseline, is always run)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every type in this process (no per-type peak RSS)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_kv_cache.json"))
    ap.add_argument("--worker-type", help=argparse.SUPPRESS)
    ap.add_argument("--worker-length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker-windows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker_type:
        worker(a)
        return {}
    lengths = parse_ints(a.lengths, "--lengths", 2)
    counts = parse_ints([a.windows], "--windows", 1)
    if len(counts) == 1:
        counts = counts * len(lengths)
    if len(counts) != len(lengths):
        raise SystemExit(f"--windows {a.windows}: give one count or one per length ({len(lengths)})")
    types = ["f16"] + [t for t in a.types.split(",") if t and t != "f16"]
    if bad := [t for t in types if t not in TYPES]:
        raise SystemExit(f"--types: {bad} are not cache types ({', '.join(TYPES)})")
    if a.chunk < 1:
        raise SystemExit(f"--chunk {a.chunk} must be >= 1")

    from pocketlm.kvcache import kv_cache_bytes
    t_all, load_before = time.perf_counter(), os.getloadavg()
    model, tok = load_model(a.model)
    ids, text_name = text_tokens(tok, a.text)
    native = model.config
    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    rows, extensions = [], {}
    for L, count in zip(lengths, counts):
        wins = windows_of(ids, L, count)
        model.config, rotary = native, model.rotary_emb
        ext = extend(model, L, a.extend)
        extensions[str(L)] = ext
        base_top = base_ppl = None
        for t in types:
            if a.in_process:
                total, n, top, secs = run_type(model, wins, t, a.chunk)
                rss = {}
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--lengths", str(L), "--chunk", str(a.chunk),
                       "--extend", a.extend, "--worker-type", t, "--worker-length", str(L),
                       "--worker-windows", str(count), "--worker-dir", str(tmp)]
                cmd += ["--model", a.model] if a.model else []
                cmd += ["--text", a.text] if a.text else []
                subprocess.run(cmd, check=True)
                res = json.loads((tmp / f"{L}-{t}.json").read_text())
                total, n, secs = res["nll"], res["tokens"], res["seconds"]
                top = torch.from_numpy(np.load(tmp / f"{L}-{t}.npy")).long()
                rss = {"peak_rss_mb": res["peak_rss_mb"], "rss_after_load_mb": res["rss_after_load_mb"]}
            ppl = math.exp(total / n)
            if t == "f16":
                base_top, base_ppl = top, ppl
            row = {"length": L, "kv_cache": t, "windows": count, "perplexity": ppl, "ppl_vs_f16": ppl / base_ppl,
                   "top1_agree_f16": (top == base_top).float().mean().item(),
                   "cache_bytes": kv_cache_bytes(model.config, L, t),
                   "cache_vs_f16": kv_cache_bytes(model.config, L, t) / kv_cache_bytes(model.config, L, "f16"),
                   "seconds": secs, **rss}
            rows.append(row)
            print(f"{L} {t}: ppl {ppl:.3f} ({secs:.0f} s)", flush=True)
        model.config, model.rotary_emb = native, rotary
    print(f"{'length':>6} {'cache':6} {'ppl':>9} {'vs f16':>8} {'top-1 = f16':>11} {'bytes vs f16':>12} "
          f"{'peak RSS MiB':>12} {'s':>6}")
    for r in rows:
        peak = f"{r['peak_rss_mb']:12.0f}" if "peak_rss_mb" in r else f"{'-':>12}"
        print(f"{r['length']:6d} {r['kv_cache']:6} {r['perplexity']:9.3f} {r['ppl_vs_f16']:8.4f} "
              f"{r['top1_agree_f16']:11.4f} {r['cache_vs_f16']:12.3f} {peak} {r['seconds']:6.1f}")
    out = {"model": "default model (nano, 11.6M, float32)" if a.model is None else a.model,
           "model_context": native.max_position_embeddings, "rope_theta": native.rope_theta,
           "text": text_name, "text_tokens": len(ids), "windows": dict(zip(map(str, lengths), counts)),
           "chunk": a.chunk, "extension": extensions, "isolated_processes": not a.in_process,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "load_average_before": load_before, "load_average": os.getloadavg(),
           "total_s": time.perf_counter() - t_all, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
