"""Context extension with fine-tuning at the same budget: LongRoPE vs position interpolation vs NTK-aware, same run.

    python bench/bench_longctx_finetune.py [--original 256] [--scale 4] [--tokens 16384] [--passkey-samples 4]
                                           [--out bench/results/bench_longctx_finetune.json]

Start: the embedded default model (pocketlm's `nano`, pretrained on 256-token rows), float32. Each method runs
`pocketlm train longctx` (pocketlm.train.longctx) from that same start, with the same fine-tuning tokens, seed,
batch and learning rate: "longrope" (factors from LongRoPE's evolutionary search on one held-out window),
"pi" (every frequency / s), "ntk" (NTK-aware, s^(2i/(d-2))). Fine-tuning text: the licence texts Debian ships in
/usr/share/common-licenses except GPL-3; test text: the GPL-3 (else README.md halves), never trained on.
Reported per method, before ("start": factors only) and after fine-tuning: test perplexity at the target length by
position bucket, perplexity on `original`-token windows (the short factors: short-context quality, against the
untouched model), and passkey accuracy (pocketlm.eval.longctx, depth 50%) at original, 2x, 4x, ... and the target length.
"none" is the control: plain RoPE (extrapolating past `original`), "start" the untouched model, fine-tuned with the
same tokens at the original length (rows of `original` tokens, scale x as many per step): how much of the gain is
adaptation to the text rather than to the length. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from longctx_windows import ROOT, nll_by_position, test_and_train_text, windows  # bench/: shared with bench_longrope


def passkey(model, tok, lengths, samples) -> dict[str, float]:
    from pocketlm.eval.backends import PocketLMBackend
    from pocketlm.eval.longctx import run
    backend = PocketLMBackend(model, tok, max_length=max(lengths))
    res = run(backend, ["passkey"], lengths, [50], samples=samples, seed=0)
    return res["tasks"]["passkey"]["by_length"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", type=int, default=256)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--tokens", type=int, default=16384, help="fine-tuning tokens per method")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--test-windows", type=int, default=2)
    ap.add_argument("--passkey-samples", type=int, default=4)
    ap.add_argument("--bucket", type=int, default=128)
    ap.add_argument("--methods", default="longrope,pi,ntk")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_longctx_finetune.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)

    import pocketlm
    from pocketlm.api import default_model_path
    from pocketlm.data.shards import write_shards
    from pocketlm.train.longctx import prepare, train_config
    from pocketlm.train.loop import train
    t_all = time.perf_counter()
    path = default_model_path()
    tok = pocketlm.Tokenizer.from_pretrained(path)
    T, O = int(a.original * a.scale), a.original
    test_text, train_text = test_and_train_text()
    test_ids, train_ids = tok.encode(test_text), tok.encode(train_text)
    test_long, test_short = windows(test_ids, T, a.test_windows), windows(test_ids, O, a.test_windows * int(a.scale))
    lengths = sorted({min(O << k, T) for k in range(int(math.log2(max(T // O, 1))) + 2)})  # O, 2O, 4O, ... T
    work = Path(tempfile.mkdtemp(prefix="bench-longctx-"))
    write_shards(work / "text", [train_ids], dtype="uint16")

    def evaluate(model) -> dict:
        nll = nll_by_position(model, test_long)  # (T-1,)
        by_pos = {f"{i}-{min(i + a.bucket, T) - 1}": math.exp(nll[max(i - 1, 0):i + a.bucket - 1].mean().item())
                  for i in range(0, T, a.bucket)}
        return {"perplexity": math.exp(nll.mean().item()),
                "perplexity_beyond_original": math.exp(nll[O - 1:].mean().item()),
                "perplexity_short_windows": math.exp(nll_by_position(model, test_short).mean().item()),
                "by_position": by_pos}

    rows, timings = {}, {}
    base = pocketlm.load(str(path), dtype=torch.float32).eval()
    base.config = base.config.replace(max_position_embeddings=max(T, base.config.max_position_embeddings))
    t0 = time.perf_counter()
    rows["none"] = {"after": evaluate(base), "passkey_before": passkey(base, tok, lengths, a.passkey_samples)}
    timings["none_eval_s"] = time.perf_counter() - t0
    (work / "short").mkdir()
    for f in path.iterdir():  # the start folder with the length it was trained at
        if f.is_file():
            shutil.copy2(f, work / "short" / f.name)
    cfg = json.loads((work / "short" / "config.json").read_text())
    cfg["max_position_embeddings"] = O
    (work / "short" / "config.json").write_text(json.dumps(cfg, indent=2))
    # control: the same tokens at the original length, no scaling (how much is plain domain adaptation)
    from pocketlm.train.config import replace
    t0 = time.perf_counter()
    info0 = {"target": O}
    tc = train_config(work / "run-none", info0, tokens=a.tokens, batch_size=int(a.scale), lr=a.lr, save_every=10**6,
                      num_threads=1)
    tc = replace(tc, model=str(work / "short"), sources={"text": str(work / "text")})
    train(tc, work / "run-none", resume="never", progress=False)
    ctrl = pocketlm.load(str(work / "run-none" / "model"), dtype=torch.float32).eval()
    ctrl.config = ctrl.config.replace(max_position_embeddings=T)
    rows["none"]["before"] = rows["none"]["after"]
    rows["none"]["after"] = evaluate(ctrl)
    rows["none"]["passkey_after"] = passkey(ctrl, tok, lengths, a.passkey_samples)
    rows["none"]["steps"] = tc.total_steps
    timings["none_train_s"] = time.perf_counter() - t0
    print(f"none: {tc.total_steps} steps of {O} tokens x {int(a.scale)} rows", flush=True)
    for method in a.methods.split(","):
        run = work / f"run-{method}"
        t0 = time.perf_counter()
        info = prepare(work / "short", run, work / "text", scale=a.scale, method=method, original=O,
                       search_windows=1, population=a.population, generations=a.generations)
        t_prep = time.perf_counter() - t0
        start = pocketlm.load(str(run / "start"), dtype=torch.float32).eval()
        before = evaluate(start)
        t0 = time.perf_counter()
        tc = train_config(run, info, tokens=a.tokens, batch_size=1, lr=a.lr, save_every=10**6, num_threads=1)
        records = train(tc, run, resume="never", progress=False)
        t_train = time.perf_counter() - t0
        tuned = pocketlm.load(str(run / "model"), dtype=torch.float32).eval()
        t0 = time.perf_counter()
        rows[method] = {"before": before, "after": evaluate(tuned),
                        "passkey_after": passkey(tuned, tok, lengths, a.passkey_samples),
                        "long_factor": info["long_factor"], "steps": tc.total_steps,
                        "final_train_loss": records[-1]["loss"] if records else None,
                        "search": {k: info[k] for k in ("search_perplexity", "baselines", "evaluated") if k in info}}
        timings[method] = {"prepare_s": t_prep, "train_s": t_train, "eval_s": time.perf_counter() - t0}
        print(f"{method}: prepare {t_prep:.0f} s, {tc.total_steps} steps in {t_train:.0f} s", flush=True)

    hdr = (f"{'method':9} {'ppl@' + str(T) + ' start':>14} {'ppl@' + str(T):>9} {'>' + str(O):>9} "
           f"{'ppl@' + str(O) + '(short)':>14} " + " ".join(f"{'pk@' + str(L):>7}" for L in lengths))
    print(hdr)
    for m, r in rows.items():
        print(f"{m:9} {r['before']['perplexity']:14.2f} {r['after']['perplexity']:9.2f} "
              f"{r['after']['perplexity_beyond_original']:9.2f} {r['after']['perplexity_short_windows']:14.2f} "
              + " ".join(f"{r['passkey_after'][str(L)]:7.2f}" for L in lengths))
    out = {"model": "default model (nano, trained on 256-token rows), float32", "original": O, "target": T,
           "fine_tune_tokens_per_method": a.tokens, "lr": a.lr, "batch_rows": 1, "train_text_tokens": len(train_ids),
           "test_long_windows": len(test_long), "test_short_windows": len(test_short),
           "passkey_samples_per_length": a.passkey_samples, "passkey_lengths": lengths, "results": rows,
           "timings_s": timings, "total_s": time.perf_counter() - t_all, "load_average": os.getloadavg(),
           "cpu_threads": 1}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.5))
        xs = [i + a.bucket / 2 for i in range(0, T, a.bucket)]
        for m, r in rows.items():
            ax.plot(xs, list(r["after"]["by_position"].values()), marker="o", label=m)
            bx.plot(lengths, [r["passkey_after"][str(L)] for L in lengths], marker="o", label=m)
        ax.axvline(O, color="grey", linestyle=":")
        ax.set(xlabel="position", ylabel="test perplexity after fine-tuning", yscale="log")
        bx.set(xlabel="prompt length", ylabel="passkey accuracy", ylim=(-0.05, 1.05))
        ax.legend()
        png = Path(a.out).with_suffix(".png")
        fig.savefig(png, dpi=110, bbox_inches="tight")
        print(f"wrote {png}")
    except ImportError:
        pass
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out} ({out['total_s']:.0f} s, load average {out['load_average'][0]:.1f})")


if __name__ == "__main__":
    main()
