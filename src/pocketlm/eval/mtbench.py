"""MT-bench (Zheng et al. 2023), single-answer grading as FastChat's `llm_judge` runs it.

Files (FastChat's layout, read from `--data-dir D`, nothing is downloaded):
- `D/mt_bench/question.jsonl`: one object per line, `question_id`, `category`, `turns` (two user messages), and
  for math/reasoning/coding optionally `reference` (reference answers, one per turn);
- `D/mt_bench/reference_answer/gpt-4.jsonl` (optional, FastChat's reference answers; wins over `reference`):
  `question_id`, `choices: [{"index": 0, "turns": [...]}]`;
- `D/judge_prompts.jsonl` (or `D/mt_bench/judge_prompts.jsonl`): `name`, `type`, `system_prompt`,
  `prompt_template`, `output_format`; the four single-answer prompts are used: `single-v1`, `single-math-v1` (turn
  1), `single-v1-multi-turn`, `single-math-v1-multi-turn` (turn 2); the math ones for the categories that need
  a reference (math, reasoning, coding, arena-hard-200).

Answers: the model under test answers both turns in its own chat format (turn 2 sees turn 1 and its answer),
sampled at FastChat's per-category temperature (writing/roleplay 0.7, stem/humanities 0.1, extraction, math,
coding, reasoning 0.0 = greedy, any other category 0.7), seed `seed + question_id`, up to 1024 new tokens.
Judging: each turn is one chat request (system prompt, then the filled template) to the judge endpoint at
temperature 0, up to 2048 tokens. The score is the first `[[x]]` in the judgment, else the first `[x]`, else -1
(FastChat's `one_score_pattern` and its backup); -1 scores are left out of the averages, as in FastChat's
`show_result`.

Outputs (`--out DIR`): `model_answer/<model>.jsonl` and `model_judgment/<judge>_single.jsonl` in FastChat's
record shapes (both also serve as caches: a rerun reuses every answer and verdict whose inputs are unchanged,
so it costs no generation and no judge request), `mt_bench.json`, `mt_bench.txt` (table per category) and
`mt_bench_radar.png`.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.eval.data import EvalDataError, field as get_field, malformed, read_jsonl
from pocketlm.eval.judge import Judge, JudgeCache, digest

QUESTION_LAYOUT = ("mt_bench/question.jsonl (FastChat llm_judge data): objects with question_id, category, turns "
                   "(a list of user messages) and optionally reference (a list of reference answers)")
PROMPTS_LAYOUT = ("judge_prompts.jsonl (FastChat llm_judge data): objects with name, type, system_prompt, "
                  "prompt_template, output_format; needs single-v1, single-math-v1, single-v1-multi-turn, "
                  "single-math-v1-multi-turn")
REFERENCE_LAYOUT = "mt_bench/reference_answer/<model>.jsonl: objects with question_id, choices [{index, turns}]"
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
DEFAULT_TEMPERATURE = 0.7
NEED_REF = ("math", "reasoning", "coding", "arena-hard-200")
PROMPT_NAMES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
PAPER = {"phi-3-mini": 8.38, "phi-3-small": 8.70, "phi-3-medium": 8.91, "gpt-3.5-1106": 8.35}  # 2-round avg

_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass
class Question:
    id: int
    category: str
    turns: list[str]
    reference: list[str] = field(default_factory=list)


@dataclass
class MTBenchData:
    questions: list[Question]
    prompts: dict[str, dict]


def parse_score(judgment: str) -> float:
    """FastChat's single-answer score: the first [[x]], else the first [x], else -1."""
    m = _SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)
    if not m:
        return -1.0
    try:
        return float(ast.literal_eval(m.group(1)))
    except (ValueError, SyntaxError):
        return -1.0


def _find_prompts(root: Path) -> Path:
    for p in (root / "judge_prompts.jsonl", root.parent / "judge_prompts.jsonl"):
        if p.is_file():
            return p
    raise EvalDataError(f"{root / 'judge_prompts.jsonl'} (or {root.parent / 'judge_prompts.jsonl'}): file not "
                        f"found; expected layout: {PROMPTS_LAYOUT}")


def load(root: Path) -> MTBenchData:
    """Questions, reference answers and judge prompts from `root` (the `mt_bench` folder)."""
    path = root / "question.jsonl"
    questions = []
    for n, r in enumerate(read_jsonl(path, QUESTION_LAYOUT), 1):
        qid = get_field(r, "question_id", path, n, QUESTION_LAYOUT, int)
        turns = get_field(r, "turns", path, n, QUESTION_LAYOUT, list)
        if not turns or not all(isinstance(t, str) for t in turns) or len(turns) > 2:
            raise malformed(path, f" record {n}", "turns must be one or two strings", QUESTION_LAYOUT)
        ref = r.get("reference") or []
        if not isinstance(ref, list) or not all(isinstance(t, str) for t in ref):
            raise malformed(path, f" record {n}", "reference must be a list of strings", QUESTION_LAYOUT)
        questions.append(Question(qid, get_field(r, "category", path, n, QUESTION_LAYOUT, str), turns, ref))
    if len({q.id for q in questions}) != len(questions):
        raise malformed(path, "", "question_id values repeat", QUESTION_LAYOUT)
    ref_dir = root / "reference_answer"
    if ref_dir.is_dir():
        by_id = {q.id: q for q in questions}
        for ref_path in sorted(ref_dir.glob("*.jsonl"))[:1]:  # FastChat: gpt-4.jsonl
            for n, r in enumerate(read_jsonl(ref_path, REFERENCE_LAYOUT), 1):
                qid = get_field(r, "question_id", ref_path, n, REFERENCE_LAYOUT, int)
                choices = get_field(r, "choices", ref_path, n, REFERENCE_LAYOUT, list)
                turns = choices[0].get("turns") if choices and isinstance(choices[0], dict) else None
                if not isinstance(turns, list):
                    raise malformed(ref_path, f" record {n}", "choices[0].turns missing", REFERENCE_LAYOUT)
                if qid in by_id:
                    by_id[qid].reference = [str(t) for t in turns]
    ppath = _find_prompts(root)
    prompts = {}
    for n, r in enumerate(read_jsonl(ppath, PROMPTS_LAYOUT), 1):
        name = get_field(r, "name", ppath, n, PROMPTS_LAYOUT, str)
        prompts[name] = {k: get_field(r, k, ppath, n, PROMPTS_LAYOUT, str)
                         for k in ("type", "system_prompt", "prompt_template", "output_format")}
    for name in PROMPT_NAMES:
        if name not in prompts:
            raise malformed(ppath, "", f"no prompt named {name!r} (has {sorted(prompts)})", PROMPTS_LAYOUT)
        if prompts[name]["output_format"] != "[[rating]]" or prompts[name]["type"] != "single":
            raise malformed(ppath, "", f"prompt {name!r} is not a single-answer [[rating]] prompt", PROMPTS_LAYOUT)
    for q in questions:
        if q.category in NEED_REF and len(q.reference) < len(q.turns):
            raise malformed(path, "", f"question {q.id} ({q.category}) needs a reference answer per turn (in "
                            "'reference' or reference_answer/gpt-4.jsonl)", QUESTION_LAYOUT)
    return MTBenchData(questions, prompts)


def judge_messages(data: MTBenchData, q: Question, answers: list[str], turn: int) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) that judge `turn` (1 or 2) of `q` answered by `answers`."""
    math = q.category in NEED_REF
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = data.prompts[name]
    kw = {}
    if math:
        kw["ref_answer_1"] = q.reference[0]
        if turn == 2:
            kw["ref_answer_2"] = q.reference[1]
    if turn == 1:
        text = p["prompt_template"].format(question=q.turns[0], answer=answers[0], **kw)
    else:
        text = p["prompt_template"].format(question_1=q.turns[0], question_2=q.turns[1], answer_1=answers[0],
                                           answer_2=answers[1], **kw)
    msgs = ([{"role": "system", "content": p["system_prompt"]}] if p["system_prompt"] else []) + \
        [{"role": "user", "content": text}]
    return name, msgs


def _answers(backend, model_id: str, data: MTBenchData, out: Path, max_tokens: int, seed: int,
             progress: bool) -> dict[int, list[str]]:
    """Both turns of every question, from the cache file where its inputs are unchanged, else generated."""
    path = out / "model_answer" / f"{model_id}.jsonl"
    cache = JudgeCache(path)  # the same append-only JSONL store, keyed by the question and settings
    got = {}
    for i, q in enumerate(data.questions):
        temp = TEMPERATURE.get(q.category, DEFAULT_TEMPERATURE)
        key = f"{model_id}|{q.id}|{digest([q.turns, temp, max_tokens, seed])}"
        hit = cache.get(key)
        if hit is None:
            msgs: list[dict] = []
            turns = []
            for t in q.turns:
                msgs.append({"role": "user", "content": t})
                (text,) = backend.generate([list(msgs)], max_tokens=max_tokens, temperature=temp,
                                           seed=seed + q.id)
                text = text.strip()
                turns.append(text)
                msgs.append({"role": "assistant", "content": text})
            hit = {"key": key, "question_id": q.id, "answer_id": digest([key, turns]), "model_id": model_id,
                   "choices": [{"index": 0, "turns": turns}], "temperature": temp}
            cache.put(hit)
            if progress:
                print(f"mt-bench: answered {i + 1}/{len(data.questions)}", file=sys.stderr)
        got[q.id] = hit["choices"][0]["turns"]
    return got


def run(backend, model_id: str, data: MTBenchData, judge: Judge, out: Path, *, max_tokens: int = 1024,
        seed: int = 0, progress: bool = True) -> dict:
    """Answer, judge and score every question; returns the JSON-ready result (also written to `out`)."""
    out = Path(out)
    answers = _answers(backend, model_id, data, out, max_tokens, seed, progress)
    rows = []
    for q in data.questions:
        for turn in range(1, len(q.turns) + 1):
            name, msgs = judge_messages(data, q, answers[q.id], turn)
            rec = judge.ask(f"{model_id}|{q.id}|{turn}|{name}", msgs, question_id=q.id, model=model_id,
                            turn=turn, user_prompt=msgs[-1]["content"], prompt_name=name)
            score = parse_score(rec["judgment"])
            rows.append({"question_id": q.id, "category": q.category, "turn": turn, "score": score,
                         "prompt": name})
    result = summarize(rows) | {"model": model_id, "judge": judge.model, "judge_requests": judge.requests,
                                "paper": PAPER}
    write(result, rows, out)
    return result


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict]) -> dict:
    """Per category and overall: turn 1, turn 2 and both-turn means over valid (>= 0) scores."""
    ok = [r for r in rows if r["score"] >= 0]
    cats = [c for c in CATEGORIES if any(r["category"] == c for r in rows)] + \
        sorted({r["category"] for r in rows} - set(CATEGORIES))

    def block(rs):
        return {"turn1": _mean([r["score"] for r in rs if r["turn"] == 1]),
                "turn2": _mean([r["score"] for r in rs if r["turn"] == 2]),
                "score": _mean([r["score"] for r in rs]), "n": len(rs)}

    return {"overall": block(ok), "categories": {c: block([r for r in ok if r["category"] == c]) for c in cats},
            "invalid": len(rows) - len(ok)}


def _fmt(x) -> str:
    return f"{x:6.2f}" if x is not None else f"{'-':>6}"


def table(result: dict) -> str:
    head = f"{'category':<12} {'turn 1':>6} {'turn 2':>6} {'mean':>6} {'n':>4}"
    lines = [head, "-" * len(head)]
    for c, b in result["categories"].items():
        lines.append(f"{c:<12} {_fmt(b['turn1'])} {_fmt(b['turn2'])} {_fmt(b['score'])} {b['n']:>4}")
    o = result["overall"]
    lines += ["-" * len(head), f"{'MT-bench':<12} {_fmt(o['turn1'])} {_fmt(o['turn2'])} {_fmt(o['score'])} "
              f"{o['n']:>4}"]
    if result.get("invalid"):
        lines.append(f"({result['invalid']} judgments without a [[rating]] left out)")
    lines.append("paper (2-round avg): " + ", ".join(f"{k} {v:.2f}" for k, v in result["paper"].items()))
    return "\n".join(lines)


def write(result: dict, rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mt_bench.json").write_text(json.dumps(result | {"rows": rows}, indent=2, sort_keys=True) + "\n")
    (out / "mt_bench.txt").write_text(table(result) + "\n")
    try:
        radar(result, out / "mt_bench_radar.png")
    except ImportError:
        print("pocketlm eval: matplotlib is not installed: no mt_bench_radar.png", file=sys.stderr)


def radar(result: dict, path: Path) -> Path:
    """Per-category mean score (0-10) on a polar plot, as the MT-bench paper draws it."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cats = list(result["categories"])
    vals = [result["categories"][c]["score"] or 0.0 for c in cats]
    angles = [2 * math.pi * i / len(cats) for i in range(len(cats))]
    fig = plt.figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot(111, polar=True)
    ax.plot(angles + angles[:1], vals + vals[:1], marker="o", label=result.get("model", "model"))
    ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.2)
    ax.set_xticks(angles)
    ax.set_xticklabels(cats)
    ax.set_ylim(0, 10)
    ax.set_title(f"MT-bench ({result.get('judge', 'judge')} as judge)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
