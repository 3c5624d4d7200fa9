"""On-policy safety preference pairs for DPO: the model's own answers to harmful requests are the rejected side.

Off-policy refusal data (SFT on refusal turns, DPO against a fixed compliance text) leaves what a model actually
writes for a harmful request it still answers untouched: the default model's compliant replies start "To make
...", never "Sure! Here is how", so a pair against a template barely moves them. This builder asks the model
itself (the break-fix loop of the Phi-3 safety post-training, at small scale):

- **harmful** requests of the topic tree (`domains.harmful.requests`, each with up to `variants` of its prefixes
  and suffixes): the model's greedy reply and `samples` sampled replies. Every reply that is not a refusal
  (`eval.simple_qa.is_refusal`) becomes a pair: chosen = one of the tree's refusals, rejected = that reply. A
  request the model refused every time gets one pair against the tree's compliance text, so DPO keeps it.
- **benign** look-alikes (`domains.benign.requests`): chosen = the teacher's answer (greedy, checked: not a
  refusal, not degenerate), rejected = the model's reply where that is a refusal, else one of the tree's benign
  refusals, so the push towards refusing stays tied to harm and not to words like "kill" or "shoot".

More requests can come from a JSON file (`--requests FILE`: `{"harmful": [...], "benign": [...]}`, appended to
the tree's lists; `recipe-data/safety/requests.json` is the default model's). Every request is checked against
simple-qa first (`EvalGuard`): a request that leaks an evaluation item is
skipped and counted. The output is JSONL `{"id", "prompt": [messages], "chosen", "rejected", "meta"}`, the
format `pocketlm train dpo` reads, and a report beside it.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from pocketlm.data.teacher_chat import EvalGuard, load_tree, read_json_file
from pocketlm.data.records import DataPipelineError
from pocketlm.eval.simple_qa import is_degenerate, is_refusal

MAX_TOKENS = 128  # as simple-qa: the reply the evaluation would see
SAMPLE_TEMPERATURE = 0.8

Generate = Callable[[list[list[dict]], float, int], list[str]]
"""(conversations, temperature, seed) -> one reply per conversation (greedy at temperature 0)."""


HARMFUL_KEYS = ("requests", "prefixes", "suffixes", "refusals", "compliance")


def harmful_prompts(h: dict, variants: int, seed: int) -> list[str]:
    """Each request of harmful domain `h` with up to `variants` distinct (prefix, suffix) wrappings; the plain one
    first."""
    combos = sorted({(p, s) for p in h["prefixes"] for s in h["suffixes"]} - {("", "")})
    out = []
    for i, req in enumerate(h["requests"]):
        r = random.Random(f"{seed}:{i}")
        picked = [("", "")] + r.sample(combos, min(max(variants - 1, 0), len(combos)))
        out += [f"{p}{req}{s}" for p, s in picked]
    return out


def add_requests(tree: dict, path: str | Path) -> dict:
    """The tree with the harmful and benign requests of JSON file `path` appended (a copy; duplicates dropped)."""
    path = Path(path)
    extra = read_json_file(path, "--requests")
    if not isinstance(extra, dict) or not set(extra) & {"harmful", "benign"}:
        raise DataPipelineError(f"--requests {path}: needs a 'harmful' and/or 'benign' list of requests")
    domains = dict(tree["domains"])
    for name in ("harmful", "benign"):
        more = extra.get(name, [])
        if not isinstance(more, list) or not all(isinstance(x, str) and x.strip() for x in more):
            raise DataPipelineError(f"--requests {path}: {name!r} must be a list of non-empty strings")
        d = dict(domains.get(name) or {})
        d["requests"] = list(dict.fromkeys(list(d.get("requests", [])) + more))
        domains[name] = d
    return dict(tree, domains=domains)


def _domain(tree: dict, name: str, keys: Sequence[str]) -> dict:
    d = tree["domains"].get(name)
    if not isinstance(d, dict):
        raise DataPipelineError(f"topic tree: needs a domains.{name} object for safety pairs")
    for k in keys:
        if not isinstance(d.get(k), list) or not d[k] or not all(isinstance(x, str) for x in d[k]):
            raise DataPipelineError(f"topic tree: domains.{name}.{k} must be a non-empty list of strings")
    return d


def _pair(prompt: str, chosen: str, rejected: str, meta: dict) -> dict:
    key = json.dumps([prompt, chosen, rejected], ensure_ascii=False)
    return {"id": "safety-pref/" + hashlib.sha1(key.encode()).hexdigest()[:20],
            "prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected, "meta": meta}


def build(student: Generate, teacher: Generate, tree: dict, *, variants: int = 3, samples: int = 2,
          seed: int = 0, guard: EvalGuard | None = None, log=None) -> tuple[list[dict], dict]:
    """The pairs and a report (counts per kind, replies the model refused or answered, skipped requests)."""
    h = _domain(tree, "harmful", HARMFUL_KEYS)
    b = _domain(tree, "benign", ("requests", "refusals"))
    guard = guard if guard is not None else EvalGuard()
    r = random.Random(seed)
    report: Counter = Counter()
    leaks: list[str] = []

    def clean(prompts: list[str]) -> list[str]:
        kept = []
        for p in prompts:
            hit = guard.question(p) or guard.text(p)
            if hit:
                leaks.append(f"{p!r} ({hit})")
            else:
                kept.append(p)
        return kept

    def replies(gen: Generate, prompts: list[str], n_samples: int) -> list[list[str]]:
        convs = [[{"role": "user", "content": p}] for p in prompts]
        out = [[t] for t in gen(convs, 0.0, seed)]
        for k in range(n_samples):
            for row, t in zip(out, gen(convs, SAMPLE_TEMPERATURE, seed + 1 + k)):
                row.append(t)
        return out

    pairs: list[dict] = []
    harmful = clean(harmful_prompts(h, variants, seed))
    if log:
        log(f"safety pairs: {len(harmful)} harmful requests x {1 + samples} replies of the model")
    for prompt, texts in zip(harmful, replies(student, harmful, samples)):
        answers = [t.strip() if t.strip() and not is_refusal(t) else None for t in texts]  # greedy first
        answered = [t for t in answers if t is not None]
        report["harmful_replies"] += len(texts)
        report["harmful_replies_answered"] += len(answered)
        report["harmful_greedy_answered"] += int(answers[0] is not None)
        for t in dict.fromkeys(answered):  # each distinct answer once
            pairs.append(_pair(prompt, r.choice(h["refusals"]), t, {"domain": "harmful", "rejected_kind":
                                                                   "model_answer"}))
            report["pairs_harmful_on_policy"] += 1
        if not answered:
            pairs.append(_pair(prompt, r.choice(h["refusals"]), r.choice(h["compliance"]),
                               {"domain": "harmful", "rejected_kind": "template_compliance"}))
            report["pairs_harmful_template"] += 1
    benign = clean(list(b["requests"]))
    if log:
        log(f"safety pairs: {len(benign)} benign look-alikes: the teacher's answer and the model's reply")
    answers = [t[0].strip() for t in replies(teacher, benign, 0)]
    mine = [t[0].strip() for t in replies(student, benign, 0)]
    for prompt, answer, own in zip(benign, answers, mine):
        if not answer or is_refusal(answer) or is_degenerate(answer):
            report["benign_teacher_rejected"] += 1
            continue
        refused = bool(own) and is_refusal(own)
        report["benign_model_refused"] += int(refused)
        rejected = own if refused else r.choice(b["refusals"])
        pairs.append(_pair(prompt, answer, rejected, {"domain": "benign", "rejected_kind":
                                                      "model_refusal" if refused else "template_refusal"}))
        report["pairs_benign"] += 1
    out = {"harmful_requests": len(harmful), "benign_requests": len(benign), "samples": samples,
           "variants": variants, "seed": seed, "skipped_leaks": leaks, "pairs": len(pairs), **dict(report)}
    return pairs, out


def backend_generate(backend, max_tokens: int = MAX_TOKENS) -> Generate:
    """A `Generate` over an eval backend (`PocketLMBackend`, with its model's declared repetition penalty)."""
    def gen(convs, temperature, seed):
        return backend.generate(convs, max_tokens=max_tokens, temperature=temperature, seed=seed)
    return gen


def run_cli(args) -> int:
    """`pocketlm data safety-prefs MODEL --teacher TEACHER --out FILE`."""
    from pocketlm.eval.commands import local_backend

    def backend(path: str, penalty: float | None):
        be = local_backend(path)
        if penalty is not None:
            be.repetition_penalty = penalty
        return be

    if args.samples < 0:
        raise DataPipelineError(f"--samples {args.samples}: must be >= 0")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise DataPipelineError(f"--out {out} exists; pass --force to overwrite it")
    tree = load_tree(args.tree)
    if args.requests:
        tree = add_requests(tree, args.requests)
    t0 = time.time()
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    student = backend_generate(backend(args.model, None))
    teacher = backend_generate(backend(args.teacher, args.teacher_repetition_penalty))
    pairs, report = build(student, teacher, tree, variants=args.variants, samples=args.samples, seed=args.seed,
                          log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(out)
    report |= {"requests_file": args.requests, "model": args.model, "teacher": Path(args.teacher).name, "out": str(out),
               "elapsed_s": round(time.time() - t0, 1)}
    out.with_name(out.stem + ".report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "skipped_leaks"}))
    return 0
