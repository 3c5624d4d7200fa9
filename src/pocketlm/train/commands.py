"""Train Phi-3 models: two-phase pretraining, SFT and DPO, on one CPU or many GPUs, with exact resume.

  pocketlm train pretrain --recipe tiny-pretrain --run-dir runs/a --set sources.web=shards/web \
      --set sources.synthetic=shards/synthetic
  pocketlm train sft --recipe phi3-mini-sft --run-dir runs/b --set model=ckpt/Phi-3-mini-4k-instruct --resume auto
  torchrun --nproc-per-node 8 -m pocketlm.cli train pretrain --recipe micro-pretrain-gpu --run-dir runs/c
  pocketlm train pretrain --recipe nano-pretrain-cpu --run-dir runs/d --data data/pipeline-out
  pocketlm train longctx --model ckpt/short --run-dir runs/e --data text.txt --scale 4 --method longrope
      (context extension: factors + fine-tuning at the target length, pocketlm.train.longctx)

Where the data comes from: `--data DIR` reads the token shards of a `pocketlm data run` output folder (its
tokens/mixture.json: phase 1 and phase 2 draw from each phase's sources in proportion to tokens x weight); `--set
sources.NAME=PATH` names shard folders (pretrain) or JSONL files (SFT, DPO) one by one. The tiny-* recipes need
nothing: when their default sources are absent, they generate small deterministic demo data into RUN/demo-data/
(procedural lessons as byte-level tokens for tiny-pretrain; template conversations and preference pairs from
`pocketlm.data.chatgen` for tiny-sft and tiny-dpo) and say so.

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
        if task == "pretrain":
            p.add_argument("--data", default=None, metavar="DIR",
                           help="the output folder of `pocketlm data run`: train on its token shards (phase 1 and 2 "
                                "from tokens/mixture.json, each source weighted by tokens x weight)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p = sub.add_parser("recipes", help="list the recipes")
    p.add_argument("--json", action="store_true")
    from pocketlm.train import longctx
    longctx.add_arguments(sub.add_parser("longctx", help="extend a model's context: LongRoPE factors (or PI/NTK) "
                                          "+ fine-tuning at the target length (pocketlm.train.longctx)"))


def run(args) -> int:
    """Pretrain, fine-tune (SFT) or preference-tune (DPO) a model from a named recipe; list the recipes."""
    from pocketlm.train.config import RECIPES, apply_overrides, recipe
    if args.train_command == "longctx":
        from pocketlm.train import longctx
        return longctx.run(args)
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
    if getattr(args, "data", None):
        cfg = pipeline_sources(cfg, args.data)
    elif args.recipe in DEMO_RECIPES and not args.print_config:
        cfg = with_demo_data(cfg, args.recipe, args.run_dir, args.overrides)
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


def pipeline_sources(cfg, data_dir: str):
    """`cfg` reading a `pocketlm data run` output folder: sources "p1.<source>" and "p2.<source>" (the token
    shard folders of tokens/mixture.json), each phase's weights proportional to tokens x the mixture's weight.
    A source too small to give 4 rows of seq_len + 1 tokens is left out; the recipe's step counts stay."""
    from pathlib import Path

    from pocketlm.train.config import Phase, replace
    mix_path = Path(data_dir) / "tokens" / "mixture.json"
    if not mix_path.is_file():
        raise ConfigError(f"--data {data_dir}: no tokens/mixture.json (not the output folder of a finished "
                          "`pocketlm data run`)")
    try:
        mixture = json.loads(mix_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--data {data_dir}: {mix_path} is not valid JSON ({e})") from None
    names = [f"phase{i + 1}" for i in range(len(cfg.phases))]
    missing = [n for n in names if n not in mixture]
    if missing:
        raise ConfigError(f"--data {data_dir}: the recipe has {len(cfg.phases)} phases but mixture.json has no "
                          f"{missing}; it has {sorted(mixture)}")
    sources, phases = {}, []
    for i, (phase, name) in enumerate(zip(cfg.phases, names)):
        weights = {}
        for src, info in sorted(mixture[name].items()):
            if info.get("tokens", 0) <= 4 * (cfg.seq_len + 1) or info.get("weight", 1.0) <= 0:
                continue
            key = f"p{i + 1}.{src}"
            sources[key] = str(Path(data_dir) / "tokens" / info["path"])
            weights[key] = info["tokens"] * float(info.get("weight", 1.0))
        if not weights:
            raise ConfigError(f"--data {data_dir}: {name} has no source with more than {4 * (cfg.seq_len + 1)} "
                              "tokens")
        total = sum(weights.values())
        phases.append(Phase(phase.name, phase.steps, {k: round(v / total, 6) for k, v in weights.items()}))
    return replace(cfg, sources=sources, phases=tuple(phases))


# recipes that bring their own small data when their default sources are absent
DEMO_RECIPES = ("tiny-pretrain", "tiny-sft", "tiny-dpo")


def with_demo_data(cfg, recipe_name: str, run_dir: str, overrides: list[str]):
    """The tiny recipes with no prerequisites: when no --set names a source, each default source that does not
    exist here is generated into RUN/demo-data/, deterministically, and the config points there. Once the user
    names a source, the data is theirs: a missing one is an error naming the --set that provides it (mixing their
    data with demo data would be a surprise)."""
    from pathlib import Path
    import sys

    from pocketlm.train.config import replace
    if any(o.partition("=")[0].startswith("sources.") for o in overrides):
        return cfg
    missing = {name: path for name, path in cfg.sources.items() if not Path(path).exists()}
    if not missing:
        return cfg
    folder = Path(run_dir) / "demo-data"
    sources = dict(cfg.sources)
    for name in missing:
        sources[name] = str(_write_demo_source(folder, name, cfg))
    print(f"pocketlm train: {recipe_name}: no data given, so it trains on generated demo data in {folder} "
          f"({', '.join(sorted(missing))}); use --set sources.NAME=PATH for your own", file=sys.stderr)
    return replace(cfg, sources=sources)


# byte-level demo tokens: byte b is token id b + 3 (0-2 are pad, bos, eos), so ids stay < 259 <= vocab_size
_BYTE_OFFSET = 3


def _write_demo_source(folder, name: str, cfg):
    """One demo source: a token shard folder (pretrain) or a JSONL file (sft "chat", dpo "prefs")."""
    from pocketlm.fsutil import atomic_write_text
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.task == "pretrain":
        target = folder / name
        if (target / "index.json").is_file():
            return target
        vocab = int(cfg.model_overrides.get("vocab_size", 32064))
        if vocab < 256 + _BYTE_OFFSET:
            raise ConfigError(f"demo data needs a vocabulary of at least {256 + _BYTE_OFFSET} ids, got {vocab}")
        from pocketlm.data.shards import write_shards
        from pocketlm.data.synthetic import generate
        docs, _ = generate(200, seed=sum(map(ord, name)))  # one seed per source: web and synthetic differ
        write_shards(target, ([b + _BYTE_OFFSET for b in d.text.encode("utf-8")] for d in docs), dtype="uint16",
                     eos_id=2)
        return target
    target = folder / f"{name}.jsonl"
    if target.is_file():
        return target
    from pocketlm.data.chatgen import generate_chat, generate_prefs
    rows = generate_chat(200, 0) if cfg.task == "sft" else generate_prefs(200, 0)
    atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in rows))
    return target
