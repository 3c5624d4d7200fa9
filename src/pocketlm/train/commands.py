"""Train Phi-3 models: two-phase pretraining, SFT and DPO, on one CPU or many GPUs, with exact resume.

  pocketlm train pretrain --recipe tiny-pretrain --run-dir runs/a --set sources.web=shards/web \
      --set sources.synthetic=shards/synthetic
  pocketlm train sft --recipe phi3-mini-sft --run-dir runs/b --set model=ckpt/Phi-3-mini-4k-instruct --resume auto
  torchrun --nproc-per-node 8 -m pocketlm.cli train pretrain --recipe micro-pretrain-gpu --run-dir runs/c

A run directory holds config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/step-N/ (atomic; the weights
in the official layout), model/ (the final weights, official layout, loads with `pocketlm.load`), loss.png,
run.lock (who trains here) and shard-max-ids.json (the checked largest token id of each shard folder).
`--resume auto` continues from the newest complete checkpoint whose sha256s check out (a corrupt one is moved
aside, with a warning); the logged losses match a run that never stopped. A finished run says so and does nothing.
One trainer at a time per run directory (a lock file, run.lock, names the holder).
Recipes: `pocketlm train recipes`.
"""

from __future__ import annotations

import argparse
import json

from pocketlm.errors import ConfigError

TASKS = ("pretrain", "sft", "dpo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", required=True, metavar="TASK")
    for task in TASKS:
        p = sub.add_parser(task, help=f"{task} with a named recipe")
        p.add_argument("--recipe", required=True, help="recipe name (exact; see `pocketlm train recipes`)")
        p.add_argument("--run-dir", required=True, help="directory for checkpoints, metrics and the final model")
        p.add_argument("--resume", default="auto", metavar="auto|never|CHECKPOINT",
                       help="auto (newest intact checkpoint of the run, default), never (start fresh), or one of "
                            "the run's checkpoint folders (RUN/checkpoints/step-N)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field by dotted name, e.g. optim.lr=1e-3 (repeatable)")
        p.add_argument("--max-steps", type=int, default=None, help="stop after this step (the schedule is unchanged)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p = sub.add_parser("recipes", help="list the recipes")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    """Pretrain, fine-tune (SFT) or preference-tune (DPO) a model from a named recipe; list the recipes."""
    from pocketlm.train.config import RECIPES, apply_overrides, recipe
    if args.train_command == "recipes":
        if args.json:
            print(json.dumps({name: fn().to_dict() for name, fn in RECIPES.items()}, indent=1))
        else:
            for name, fn in RECIPES.items():
                print(f"{name:22s} {fn.__doc__.strip().splitlines()[0]}")
        return 0
    cfg = apply_overrides(recipe(args.recipe), args.overrides)
    if cfg.task != args.train_command:
        raise ConfigError(f"recipe {args.recipe!r} is a {cfg.task} recipe, not {args.train_command}")
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    _check_sources(cfg, args.recipe, args.overrides)
    from pocketlm.train.loop import train
    records = train(cfg, args.run_dir, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress)
    if records:
        last = records[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}; run directory {args.run_dir}")
    return 0


def _check_sources(cfg, recipe_name: str, overrides: list[str]) -> None:
    """Name every source path that does not exist, and the `--set` that provides it."""
    from pathlib import Path
    given = {o.partition("=")[0] for o in overrides}
    problems = []
    for name, path in cfg.sources.items():
        if Path(path).exists():
            continue
        if f"sources.{name}" in given:
            problems.append(f"--set sources.{name}={path}: no such file or folder")
        else:
            problems.append(f"needs sources.{name} (the recipe's default {path} does not exist here): "
                            f"add --set sources.{name}=PATH")
    if problems:
        raise ConfigError(f"{cfg.task} recipe {recipe_name!r} " + "; ".join(problems))
