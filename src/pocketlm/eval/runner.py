"""Run tasks against a backend: build requests, score each item, aggregate mean and standard error.

`evaluate(backend, tasks, ...)` returns a JSON-ready dict: per task the headline metric, every metric's mean
and standard error (sample std / sqrt(n), lm-eval's `mean_stderr`), the number of items, shots and format; and
per-item samples (prompt, per-choice log-likelihoods or the generation, the extracted answer, the scores) so that
two runs can be compared item by item. Everything is deterministic: shots come from a seeded sampler and
generation is greedy.

Code tasks run each completion in `sandbox.run_program` (bubblewrap isolation, honest pass/fail verdict). Where
no isolation works, `evaluate` raises `SandboxUnavailable` before generating anything, unless
`unsafe_exec=True`; the run's config records which it was (`code_isolation`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from pocketlm.eval import scoring
from pocketlm.eval.data import EvalDataError
from pocketlm.eval.prompts import LETTERS, DEFAULT_SEED, FewshotSampler, build_prompt
from pocketlm.eval.sandbox import isolation_problem, require_isolation, run_program
from pocketlm.eval.tasks import Doc, Task


def load_docs(task: Task, data_dir: Path | None, overrides: dict[str, Path] | None = None):
    root = (overrides or {}).get(task.name)
    if root is None:
        if data_dir is None:
            if task.name == "humaneval":
                return task.load(None)
            raise EvalDataError(f"task {task.name}: no data folder given (--data-dir D, with the files under "
                                f"D/{task.folder}/); expected layout: {task.layout}")
        root = Path(data_dir) / task.folder
    return task.load(Path(root))


def evaluate(backend, tasks: Sequence[Task], *, data_dir: Path | None = None, overrides=None, limit: int | None = None,
             shots: int | None = None, seed: int = DEFAULT_SEED, fmt: str = "default", chat: bool = False,
             progress: bool = True, code_timeout: float = 10.0, max_tokens: int | None = None,
             unsafe_exec: bool = False) -> dict:
    """Score `tasks` on `backend`. `unsafe_exec`: run generated code even where it cannot be isolated."""
    from tqdm import tqdm
    isolation = None
    if any(t.kind == "code" for t in tasks):
        if not unsafe_exec:
            require_isolation()  # fail before any generation, not after the first completion
        isolation = "bwrap" if isolation_problem() is None else "none (unsafe_exec)"
    results, samples = {}, {}
    for task in tasks:
        docs, pool = load_docs(task, data_dir, overrides)
        same = pool is docs  # shots drawn from the evaluated set itself: never the item being asked
        docs = docs[:limit] if limit is not None else docs
        task_fmt = fmt if (fmt == "letter" and task.kind == "mc" and all(d.options for d in docs)) else "default"
        n_shots = task.shots if shots is None else shots
        if not pool:  # 0-shot benchmark, or shots embedded in each item's text (BBH's cot-prompts)
            n_shots = task.shots if task.embedded_shots else 0
        sampler = FewshotSampler(pool, task.sampler, seed, same_as_eval=same, draw_extra=task.lm_eval_draw_extra)
        t0 = time.monotonic()
        rows = []
        bar = tqdm(docs, desc=task.name, unit="item", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for doc in bar:
            fs = sampler.sample(n_shots, doc) if pool else []
            rows.append(score_doc(backend, task, doc, fs, task_fmt, chat, code_timeout, max_tokens, unsafe_exec))
        bar.close()
        metrics = sorted({k for r in rows for k in r["scores"]})
        agg = {}
        for k in metrics:
            vals = [r["scores"][k] for r in rows if k in r["scores"]]
            agg[k] = {"mean": sum(vals) / len(vals), "stderr": scoring.mean_stderr(vals)}
        headline = "acc" if task_fmt == "letter" else task.metric
        results[task.name] = {"title": task.title, "metric": headline, "score": agg.get(headline, {}).get("mean"),
                              "stderr": agg.get(headline, {}).get("stderr"), "metrics": agg, "n": len(rows),
                              "shots": n_shots, "format": task_fmt, "chat": chat, "paper": task.paper_scores,
                              "seconds": round(time.monotonic() - t0, 3)}
        samples[task.name] = rows
    return {"results": results, "samples": samples,
            "config": {"backend": getattr(backend, "name", type(backend).__name__), "limit": limit, "shots": shots,
                       "seed": seed, "format": fmt, "chat": chat, "tasks": [t.name for t in tasks]}
            | ({"code_isolation": isolation} if isolation else {})}


def score_doc(backend, task: Task, doc: Doc, shots: list[Doc], fmt: str, chat: bool, code_timeout: float,
              max_tokens: int | None, unsafe_exec: bool = False) -> dict:
    row: dict = {"id": doc.id}
    if fmt == "letter":
        prompt = build_prompt(task, doc, shots, fmt="letter", chat=chat)
        text = backend.generate([prompt], stop=() if chat else ("\n",), max_tokens=max_tokens or (32 if chat else 5))[0]
        pred = scoring.extract_letter(text, len(doc.options))
        row |= {"prompt": prompt, "generation": text, "pred": pred, "gold": LETTERS[doc.gold],
                "scores": {"acc": float(pred == LETTERS[doc.gold])}}
    elif task.kind == "mc":
        ctx = build_prompt(task, doc, shots, chat=chat)
        conts = [task.target_delimiter + c for c in doc.choices]
        res = backend.loglikelihood([(ctx, c) for c in conts])
        lls = [r[0] for r in res]
        m = scoring.mc_metrics(lls, doc.choices, doc.gold)
        row |= {"prompt": ctx, "choices": doc.choices, "loglikelihoods": lls, "gold": doc.gold,
                "pred": m["pred"], "pred_norm": m["pred_norm"], "scores": {"acc": m["acc"], "acc_norm": m["acc_norm"]}}
    elif task.kind == "mc_partial":
        ctxs = [build_prompt(task, doc, shots, chat=chat, text=c) for c in doc.choices]
        res = backend.loglikelihood([(c, task.target_delimiter + doc.target) for c in ctxs])
        lls = [r[0] for r in res]
        m = scoring.partial_metrics(lls, doc.gold)  # type: ignore[arg-type]
        row |= {"prompt": ctxs, "continuation": doc.target, "loglikelihoods": lls, "gold": doc.gold,
                "pred": m["pred"], "scores": {"acc": m["acc"]}}
    elif task.kind == "mc2":
        ctx = build_prompt(task, doc, shots, chat=chat)
        lls = [r[0] for r in backend.loglikelihood([(ctx, " " + c) for c in doc.choices])]
        row |= {"prompt": ctx, "loglikelihoods": lls, "scores": {"mc2": scoring.mc2_metric(lls, doc.labels)}}
    elif task.kind == "gen":
        prompt = build_prompt(task, doc, shots, chat=chat)
        text = backend.generate([prompt], stop=task.stop, max_tokens=max_tokens or task.max_tokens)[0]
        pred = task.extract(text, doc)
        ok = pred is not None and task.check(pred, doc)
        row |= {"prompt": prompt, "generation": text, "pred": pred, "answers": doc.answers[:5],
                "scores": {"exact_match": float(ok)}}
    elif task.kind == "code":
        prompt = build_prompt(task, doc, shots, chat=chat)
        text = backend.generate([prompt], stop=() if chat else task.stop, max_tokens=max_tokens or task.max_tokens)[0]
        build = scoring.humaneval_parts if doc.extra["kind"] == "humaneval" else scoring.mbpp_parts
        r = run_program(build(doc, text, task.stop), timeout=code_timeout, unsafe_exec=unsafe_exec)
        row |= {"prompt": prompt, "generation": text, "status": r.status, "stderr_tail": r.stderr[-300:],
                "scores": {"pass@1": float(r.passed)}}
    else:  # pragma: no cover - the registry checks kinds
        raise AssertionError(task.kind)
    return row
