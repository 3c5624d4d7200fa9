"""Run a named recipe end to end: data -> pretraining phase 1 -> phase 2 -> SFT -> DPO -> quantize -> eval -> report.

  pocketlm recipe nano [--out recipe-runs/nano] [--corpus data/corpus]          the CPU recipe (< 30 minutes)
  pocketlm recipe small-cpu --teacher-data DIR --max-minutes 60                 the default model's recipe
  pocketlm recipe micro --until chat-data --pack-data recipe-data/micro.tar.gz  prepare the GPU recipe's data
  pocketlm recipe micro --data-archive recipe-data/micro.tar.gz --max-minutes 9 the GPU part; repeat until done
  pocketlm recipe nano --export-model DIR                                       write the final model + card
  pocketlm recipe list                                                          the recipes

Every step leaves a marker (out/steps/STEP.json) with a hash of its inputs: running the command again skips
finished steps and resumes an interrupted training step from its last checkpoint (`--resume`, the default). A
step whose inputs changed is refused unless --rebuild. With --max-minutes the run stops cleanly at a checkpoint
before the limit and exits with code 3; run the same command again to continue. The report is
out/report/report.md and report.html.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pocketlm.errors import ConfigError

PAUSED_EXIT = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="recipe name (nano, micro, nano-smoke) or 'list'")
    parser.add_argument("--out", default=None, help="run folder (default recipe-runs/NAME)")
    parser.add_argument("--corpus", default=os.environ.get("POCKETLM_CORPUS", "data/corpus"),
                        help="corpus folder from scripts/build-corpus.sh (default $POCKETLM_CORPUS or data/corpus)")
    parser.add_argument("--teacher-data", default=os.environ.get("POCKETLM_TEACHER_DATA"), metavar="DIR",
                        help="folder of `pocketlm data teacher` outputs (chats.jsonl; optionally knowledge.jsonl, "
                             "prefs.jsonl, lessons.jsonl), for recipes trained on teacher data (small-cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the recipe's")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop cleanly at a checkpoint before this many minutes (exit code 3; rerun resumes)")
    parser.add_argument("--until", default=None, metavar="STEP", help="stop after this step")
    parser.add_argument("--resume", action="store_true", default=True,
                        help="skip finished steps and resume training from checkpoints (always on)")
    parser.add_argument("--rebuild", action="store_true",
                        help="redo a step whose inputs changed, and every later step (default: refuse)")
    parser.add_argument("--pack-data", default=None, metavar="FILE",
                        help="after the data steps, write their outputs to FILE (.tar.gz) for a GPU machine")
    parser.add_argument("--data-archive", default=None, metavar="FILE",
                        help="restore the data steps from a --pack-data archive (no corpus needed)")
    parser.add_argument("--export-model", default=None, metavar="DIR",
                        help="after the run, write the final model (bf16 safetensors, tokenizer, GGUF) and "
                             "MODEL_CARD.md to DIR")
    parser.add_argument("--baseline", default=None, metavar="MODEL",
                        help="a model with the same tokenizer that the eval step scores beside the run's on the "
                             "same held-out sets (and simple-qa): e.g. the default model the run is meant to replace")
    parser.add_argument("--compare", default=None, metavar="FILE",
                        help="with --export-model: simple-qa results of other models for the card "
                             "(bench/bench_simple_qa.py's JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    """Run (or resume) a named recipe end to end and write its report."""
    from pocketlm.recipe.recipes import RECIPES, get_recipe
    from pocketlm.recipe.runner import Context, Paused, budget_seconds, pack_data, run_recipe, unpack_data
    if args.name == "list":
        for name, fn in RECIPES.items():
            r = fn()
            print(f"{name:12s} {r.description.strip().splitlines()[0]}")
        return 0
    t0 = time.time()
    recipe = get_recipe(args.name)
    if args.pack_data:
        _check_writable_file(args.pack_data, "--pack-data")  # before minutes of work, not after
    compare = _read_compare(args.compare) if args.compare else None  # the same: a bad file fails before the run
    out = Path(args.out or os.path.join("recipe-runs", recipe.name))
    corpus = Path(args.corpus) if args.corpus else None
    if args.data_archive:
        restored = unpack_data(out, Path(args.data_archive))
        if restored["restored"]:
            print(f"restored the data steps from {args.data_archive}", file=sys.stderr)
    ctx = Context(recipe=recipe, out=out, corpus=corpus if corpus and corpus.is_dir() else None,
                  teacher=Path(args.teacher_data) if args.teacher_data else None,
                  baseline=Path(args.baseline) if args.baseline else None,
                  device=args.device or recipe.device, deadline=budget_seconds(args.max_minutes),
                  progress=not args.no_progress, rebuild=args.rebuild)
    until = args.until
    if args.pack_data and until is None:
        until = "chat-data"
    try:
        run_recipe(ctx, until=until)
    except Paused as e:
        print(f"pocketlm recipe: {e}; {(time.time() - t0) / 60:.1f} minutes used. Run the same command again to "
              "resume.", file=sys.stderr)
        return PAUSED_EXIT
    if args.pack_data:
        info = pack_data(out, Path(args.pack_data))
        print(f"wrote {info['archive']} ({info['bytes'] / 2**20:.1f} MiB)", file=sys.stderr)
    if args.export_model:
        if until is not None:
            raise ConfigError("--export-model needs the whole recipe (no --until)")
        from pocketlm.recipe.export import export_model
        files = export_model(out, Path(args.export_model), compare=compare)
        print(f"wrote {args.export_model}: " + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)"
                                                         for p in files), file=sys.stderr)
    if until is None:
        print(f"report: {out / 'report' / 'report.md'} and report.html", file=sys.stderr)
    return 0


def _read_compare(path: str) -> dict:
    """`--compare FILE`: bench/bench_simple_qa.py's JSON ({"models": {label: {"model", "metrics"}}}), checked."""
    import json
    try:
        data = json.loads(Path(path).read_text())
        models = data["models"]
        if not isinstance(models, dict) or not all(isinstance(m, dict) and isinstance(m.get("model"), str)
                                                   and isinstance(m.get("metrics"), dict) for m in models.values()):
            raise TypeError("every entry of 'models' needs a 'model' string and a 'metrics' object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--compare {path}: not a bench_simple_qa.py results file ({e})") from None
    return data


def _check_writable_file(path: str, flag: str) -> None:
    """Create the folder `path` will be written in (as `mkdir -p` would), and check that it is a writable folder."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create its folder {parent} ({e.strerror})") from None
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; name the archive file to write (e.g. {path}/data.tar.gz)")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: the folder {parent} is not writable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pocketlm recipe")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
