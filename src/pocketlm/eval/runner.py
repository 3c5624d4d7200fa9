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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pocketlm.eval import scoring
from pocketlm.eval.data import EvalDataError
from pocketlm.eval.prompts import LETTERS, DEFAULT_SEED, FewshotSampler, build_prompt
from pocketlm.eval.sandbox import isolation_problem, require_isolation, run_program
from pocketlm.eval.tasks import Doc, Task


def load_docs(task: Task, data_dir: Path | None, overrides: dict[str, Path] | None = None):
    root = (overrides or {}).get(task.name)
    if root is None and task.name == "simple-qa":  # ships with pocketlm; --data simple-qa=FILE for another set
        return task.load(None)
    if root is None:
        if data_dir is None:
            if task.name == "humaneval":
                return task.load(None)
            raise EvalDataError(f"task {task.name}: no data folder given (--data-dir D, with the files under "
                                f"D/{task.folder}/); expected layout: {task.layout}")
        root = Path(data_dir) / task.folder
    from pocketlm.eval import hub
    got = hub.load(task, Path(root))  # the Hugging Face hub copy, when that is what the folder holds
    return got if got is not None else task.load(Path(root))


class FewShotError(EvalDataError):
    """More few-shot examples were asked for than the task's few-shot pool holds."""


@dataclass
class Prepared:
    """One task's items and few-shot examples, read and checked before any model work."""
    task: Task
    docs: list[Doc]
    pool: Sequence[Doc]       # few-shot pool (a LazyDocs until it is needed; untouched for 0 shots)
    same: bool                # the pool is the evaluated set itself
    shots: int                # the shots each item gets
    requested: int            # the shots asked for (--shots or the paper's)


def _fewest(pool: Sequence[Doc], docs: Sequence[Doc], same: bool) -> tuple[int, Doc | None]:
    """The fewest distinct examples the sampler can give any of `docs` (same group as the item, never the item
    itself), and that item."""
    grouped = any(d.group for d in pool)
    counts = Counter(d.group for d in pool) if grouped else None
    in_pool = {id(d) for d in pool} if same else set()
    best: tuple[int, Doc | None] = (len(pool), None)
    for doc in docs:
        n = counts[doc.group] if counts is not None and doc.group else len(pool)
        n -= id(doc) in in_pool
        if best[1] is None or n < best[0]:
            best = (n, doc)
    return best


def prepare(tasks: Sequence[Task], data_dir: Path | None, overrides: dict[str, Path] | None = None,
            shots: int | None = None, limit: int | None = None) -> list[Prepared]:
    """Read every task's files and check the shot counts; raises EvalDataError / FewShotError naming the task,
    the file and the counts. The train split is read only when shots are needed (0-shot needs only the
    evaluated split). A task whose benchmark has no few-shot source (MATH, HumanEval, ...) runs 0-shot, and the
    results record both `shots` and `shots_requested`."""
    out = []
    for task in tasks:
        docs, pool = load_docs(task, data_dir, overrides)
        same = pool is docs
        docs = list(docs[:limit] if limit is not None else docs)
        requested = task.shots if shots is None else shots
        if task.embedded_shots:  # BBH: the shots are part of each item's text, whatever was asked for
            n = task.shots
        elif requested == 0 or not pool:
            n = 0
        else:
            n = requested
            have, worst = _fewest(pool, docs, same)
            if worst is not None and have < n:
                where = f" for group {worst.group!r}" if worst.group else ""
                raise FewShotError(f"task {task.name}: {n} shots asked for but the few-shot pool{where} holds only "
                                   f"{have} usable examples{' (the item itself excluded)' if same else ''}; "
                                   f"use --shots {have} or a fuller train split; expected layout: {task.layout}")
        out.append(Prepared(task, docs, pool, same, n, requested))
    return out


def evaluate(backend, tasks: Sequence[Task], *, data_dir: Path | None = None, overrides=None, limit: int | None = None,
             shots: int | None = None, seed: int = DEFAULT_SEED, fmt: str = "default", chat: bool = False,
             progress: bool = True, code_timeout: float = 10.0, max_tokens: int | None = None,
             unsafe_exec: bool = False, prepared: Sequence[Prepared] | None = None, out: Path | None = None,
             extra_config: dict | None = None) -> dict:
    """Score `tasks` on `backend`. `unsafe_exec`: run generated code even where it cannot be isolated.
    `prepared`: the output of `prepare` (else the files are read here). `out`: after each task its samples and
    the results so far are written there (`report.write_partial`), so a later failure loses no finished task."""
    from tqdm import tqdm
    from pocketlm.eval import report
    isolation = None
    if any(t.kind == "code" for t in tasks):
        if not unsafe_exec:
            require_isolation()  # fail before any generation, not after the first completion
        isolation = "bwrap" if isolation_problem() is None else "none (unsafe_exec)"
    if prepared is None:
        prepared = prepare(tasks, data_dir, overrides, shots, limit)
    results, samples = {}, {}
    config = {"backend": getattr(backend, "name", type(backend).__name__), "limit": limit, "shots": shots,
              "seed": seed, "format": fmt, "chat": chat, "tasks": [t.name for t in tasks]} \
        | ({"code_isolation": isolation} if isolation else {}) | (extra_config or {})
    penalty = getattr(backend, "repetition_penalty", 1.0)
    if penalty != 1.0:  # generation tasks decode with the model file's declared penalty (HF: generation_config)
        config["repetition_penalty"] = penalty
    for prep in prepared:
        task, docs, pool, n_shots = prep.task, prep.docs, prep.pool, prep.shots
        task_fmt = fmt if (fmt == "letter" and task.kind == "mc" and all(d.options for d in docs)) else "default"
        sampler = FewshotSampler(pool if n_shots else [], task.sampler, seed, same_as_eval=prep.same,
                                 draw_extra=task.lm_eval_draw_extra)
        t0 = time.monotonic()
        rows = []
        bar = tqdm(docs, desc=task.name, unit="item", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for doc in bar:
            fs = sampler.sample(n_shots, doc) if n_shots and not task.embedded_shots else []
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
                              "seconds": round(time.monotonic() - t0, 3)} \
            | ({"shots_requested": prep.requested} if prep.requested != n_shots else {})
        samples[task.name] = rows
        if out is not None:
            report.write_partial({"results": results, "samples": {task.name: rows}, "config": config}, Path(out))
    return {"results": results, "samples": samples, "config": config}


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
        if doc.extra.get("images"):  # an image task (eval/vision_tasks.py): the images replace the prompt's tags
            from pocketlm.eval import vision_tasks
            res = vision_tasks.loglikelihood(backend, [(ctx, c) for c in conts], doc.extra["images"])
        else:
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
    elif task.kind == "chat_qa":  # simple-qa: always a chat turn, checked by pocketlm.eval.simple_qa
        from pocketlm.eval import simple_qa
        row |= simple_qa.score(backend, doc, max_tokens)
    else:  # pragma: no cover - the registry checks kinds
        raise AssertionError(task.kind)
    return row
