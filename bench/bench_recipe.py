"""The full `nano` recipe as a benchmark: every step's wall time, tokens and tokens/s, the final evaluations, and
ratios against baselines measured in the same run.

    python bench/bench_recipe.py [--corpus data/corpus] [--out DIR] [--recipe nano]
                                 [--json bench/results/bench_recipe.json]
    python bench/bench_recipe.py --out DIR --no-run     (a finished run: its markers' timings, plus the baselines)

1. Runs (or resumes) `pocketlm recipe NAME` in DIR (default: a fresh temporary folder). A resumed run reports the
   seconds its markers recorded, including earlier invocations (`seconds_earlier_runs`).
2. Baselines, measured in this run after the recipe:
   - throughput: 8 optimizer steps of plain nano pretraining (seq 256, batch 16, the recipe's threads) on the
     recipe's own phase-1 shards; the recipe's training tokens/s are given as ratios to it (how much the load on
     the shared machine, the SFT masks and DPO's two sequences per pair cost).
   - quality: the held-out tasks on the randomly initialised model (the recipe's preset, seed 0): the "chance"
     row the trained models are compared with (ratios of bits per byte; accuracy differences).
3. Prints a table and writes JSON (step seconds, total minutes against the recipe's budget, tokens per stage, the
   evaluation table, baselines, ratios, machine load before and after).
On a shared 2-core machine other jobs move every timing: the load averages are recorded beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loadavg() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def throughput_baseline(out: Path, recipe, steps: int = 8) -> float:
    """Median tokens/s of plain nano pretraining steps on the recipe's phase-1 data."""
    import statistics
    import shutil

    import torch
    from pocketlm.recipe.runner import Context, pretrain_config
    from pocketlm.train.config import Phase, replace
    from pocketlm.train.distributed import DistEnv
    from pocketlm.train.loop import Trainer
    cfg = pretrain_config(Context(recipe=recipe, out=out))
    cfg = replace(cfg, phases=(Phase("bench", 1000, cfg.phases[0].weights),), save_every=1000, plot=False)
    run = Path(tempfile.mkdtemp(prefix="bench-recipe-base-"))
    try:
        t = Trainer(cfg, run, env=DistEnv(device=torch.device("cpu")), progress=False)
        rates = [t.train_step()["tokens_per_s"] for _ in range(steps)]
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return statistics.median(rates[2:])


def random_init_scores(out: Path, recipe) -> dict:
    import torch
    import pocketlm
    from pocketlm.config import preset
    from pocketlm.formats import hf
    from pocketlm.recipe.evaluate import heldout_scores
    config = preset(recipe.preset).replace(**recipe.model_overrides)
    model = hf.init_weights(hf.empty_model(config, torch.float32, "cpu"), seed=recipe.seed).eval()
    tok = pocketlm.Tokenizer.from_pretrained(out / "dpo" / "model")
    with torch.no_grad():
        flat, _ = heldout_scores(model, tok, out / "heldout", limit=recipe.eval_limit)
    return flat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="nano")
    ap.add_argument("--corpus", default=os.environ.get("POCKETLM_CORPUS", "data/corpus"))
    ap.add_argument("--out", default=None, help="run folder (default: a new temporary folder)")
    ap.add_argument("--no-run", action="store_true",
                    help="do not run or check the recipe: report a finished run folder (--out) from its markers")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "bench_recipe.json"))
    args = ap.parse_args(argv)

    from pocketlm.recipe import STEPS, Context, get_recipe, run_recipe
    from pocketlm.recipe.runner import read_marker
    recipe = get_recipe(args.recipe)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"bench-recipe-{recipe.name}-"))
    load_before = loadavg()
    t0 = time.time()
    if not args.no_run:
        run_recipe(Context(recipe=recipe, out=out, corpus=Path(args.corpus), progress=True))
    elif args.out is None or any(read_marker(out, s) is None for s in STEPS):
        raise SystemExit("--no-run needs --out with a finished recipe run")
    wall_this_invocation = time.time() - t0
    markers = {s: read_marker(out, s) for s in STEPS}
    steps = {}
    for s, m in markers.items():
        steps[s] = {"seconds": round(m["seconds"] + m.get("seconds_earlier_runs", 0.0), 1),
                    **{k: v for k, v in m["summary"].items() if isinstance(v, (int, float))}}
    total_s = sum(v["seconds"] for v in steps.values())
    load_after = loadavg()

    base_tps = throughput_baseline(out, recipe)
    chance = random_init_scores(out, recipe)
    results = json.loads((out / "eval" / "results.json").read_text())
    table = results["table"]
    ratios = {}
    for row in table:
        ratios[row["model"]] = {
            "bpb_web_vs_random_init": round(row["bpb_web"] / chance["bpb_web"], 4),
            "bpb_synthetic_vs_random_init": round(row["bpb_synthetic"] / chance["bpb_synthetic"], 4),
            "arith_acc_minus_random_init": round(row["arith_acc"] - chance["arith_acc"], 4),
            "cloze_acc_minus_random_init": round(row["cloze_acc"] - chance["cloze_acc"], 4)}
    train_ratio = {s: round(steps[s]["tokens_per_s"] / base_tps, 3) for s in
                   ("pretrain-phase1", "pretrain-phase2", "sft", "dpo") if "tokens_per_s" in steps[s]}
    report = {
        "bench": "recipe", "recipe": recipe.name, "out": str(out), "machine": platform.machine(),
        "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
        "total_step_minutes": round(total_s / 60, 2), "budget_minutes": recipe.budget_minutes,
        "within_budget": recipe.budget_minutes is None or total_s / 60 <= recipe.budget_minutes,
        "wall_seconds_this_invocation": round(wall_this_invocation, 1), "ran_recipe": not args.no_run,
        "loadavg_note": ("load averages around this invocation (the recipe itself ran earlier; its tokens/s vs the "
                         "baseline show the load it met)") if args.no_run else "load averages before/after the run",
        "steps": steps,
        "baseline_pretrain_tokens_per_s": round(base_tps, 1), "train_tokens_per_s_vs_baseline": train_ratio,
        "eval": table, "random_init": chance, "eval_vs_random_init": ratios,
        "samples": results["models"]["dpo"]["samples"],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")

    print(f"\nrecipe {recipe.name}: {total_s / 60:.1f} min of step time (budget {recipe.budget_minutes} min); "
          f"load {load_before} -> {load_after}")
    print(f"{'step':<17}{'seconds':>9}{'tokens':>11}{'tok/s':>9}{'x base':>8}")
    for s in STEPS:
        v = steps[s]
        tps = v.get("tokens_per_s")
        print(f"{s:<17}{v['seconds']:>9.1f}{v.get('tokens', ''):>11}{(f'{tps:.0f}' if tps else ''):>9}"
              f"{(f'{train_ratio[s]:.2f}' if s in train_ratio else ''):>8}")
    print(f"baseline plain pretraining: {base_tps:.0f} tokens/s (measured after the recipe, same machine)")
    keys = ["arith_acc", "cloze_acc", "bpb_web", "bpb_synthetic"]
    print(f"\n{'model':<14}" + "".join(f"{k:>15}" for k in keys) + f"{'chats stop':>12}")
    print(f"{'random-init':<14}" + "".join(f"{chance[k]:>15.4f}" for k in keys))
    for row in table:
        print(f"{row['model']:<14}" + "".join(f"{row[k]:>15.4f}" for k in keys) + f"{row.get('chats_stopped', ''):>12}")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
