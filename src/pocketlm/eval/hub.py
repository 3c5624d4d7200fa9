"""The Hugging Face hub copies of the benchmarks (the datasets lm-evaluation-harness itself loads), read from
local files: Parquet shards as the hub stores them, or the same split as JSON lines / a JSON list.

A task's folder is read in its hub layout when the published layout's evaluated file is absent and a hub split
is present; a split is found as `<config>/<split>-*.parquet` (all shards, in name order), `data/<split>-*.parquet`,
`<split>-*.parquet`, `<split>.parquet`, or `<split>.jsonl` / `<split>.json` in the folder or its `<config>/`
sub-folder. Records are converted to the published layout's fields and parsed by the published loader, so the
prompts, choices and answers are the same from either copy (checked item by item in tests/test_eval_hub.py).

Datasets and splits (as lm-eval 0.4.13 reads them; evaluated split / few-shot split):
- arc_challenge, arc_easy: allenai/ai2_arc `ARC-Challenge|ARC-Easy/` test / train (`question` text,
  `choices {text, label}`, `answerKey`);
- hellaswag: Rowan/hellaswag `data/` validation / train (the published fields);
- winogrande: allenai/winogrande `winogrande_xl/` validation / train (the published fields);
- boolq: super_glue `boolq/` validation / train (`label` 0/1), or google/boolq `data/` (`answer` true/false);
- piqa: baber/piqa validation / train (`goal, sol1, sol2, label`); siqa: allenai/social_i_qa validation / train
  (`label` "1"-"3" inline);
- openbookqa: allenai/openbookqa `main/` test / train (`question_stem`, `choices {text, label}`, `answerKey`);
- commonsense_qa: tau/commonsense_qa `data/` validation / train (`question` text, `choices {label, text}`);
- mmlu: cais/mmlu `<subject>/` (or `all/`) test / dev (`question, subject, choices [4], answer` 0-3);
- anli: facebook/anli `plain_text/` test_r1..r3 / train_r1..r3 (`label` 0/1/2);
- gsm8k: openai/gsm8k `main/` test; math: EleutherAI/hendrycks_math `<subject>/` test;
- medqa: GBaker/MedQA-USMLE-4-options-hf test / train (`sent1`, `ending0..3`, `label`) or the non-hf copy
  (the published fields);
- triviaqa: mandarjoshi/trivia_qa `rc.nocontext/` (or `rc/`, `unfiltered.nocontext/`) validation / train
  (`question`, `question_id`, `answer {value, aliases, normalized_aliases}`);
- truthfulqa_mc2: truthfulqa/truthful_qa `multiple_choice/` validation (`mc2_targets {choices, labels}`);
- humaneval: openai/openai_humaneval `openai_humaneval/` test; mbpp: google-research-datasets/mbpp `full/`
  prompt + test + validation + train (task ids keep their published meaning).
Not here: gpqa (the hub file is the published CSV, already read), agieval (the hub copies, hails/agieval-*, hold
pre-rendered `query` prompts, a different prompt from AGIEval's own), bbh (lukaemon/bbh has no chain-of-thought
exemplars: use the published folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pocketlm.eval import benchmarks as B
from pocketlm.eval.data import LazyDocs, field, malformed, read_parquet, read_records
from pocketlm.eval.tasks import Doc, Task


def find_split(root: Path, split: str, configs: tuple[str, ...] = ()) -> list[Path]:
    """The files that hold `split` in a hub layout under `root` (empty if none)."""
    for base in [root / c for c in configs] + [root / "data", root]:
        if not base.is_dir():
            continue
        shards = sorted(base.glob(f"{split}-*.parquet")) or sorted(base.glob(f"{split}.parquet"))
        if shards:
            return shards
        for ext in (".jsonl", ".json", ".jsonl.gz"):
            if (base / f"{split}{ext}").is_file():
                return [base / f"{split}{ext}"]
    return []


def read_split(files: list[Path], layout: str) -> list[dict]:
    out: list[dict] = []
    for f in files:
        out += read_parquet(f, layout) if f.name.endswith(".parquet") else read_records(f, layout)
    return out


def _need(root: Path, split: str, configs: tuple[str, ...], layout: str) -> tuple[Path, list[dict]]:
    files = find_split(root, split, configs)
    if not files:
        raise malformed(root, "", f"no {split!r} split in the hub layout (looked for {'/'.join(configs or ('.',))}/"
                        f"{split}-*.parquet, data/{split}-*.parquet, {split}.jsonl)", layout)
    return files[0], read_split(files, layout)


def _ai2(r: dict, stem_key: str) -> dict:
    ch = r.get("choices") or {}
    return {"id": r.get("id"), "answerKey": r.get("answerKey"),
            "question": {"stem": r.get(stem_key),
                         "choices": [{"text": t, "label": lab} for t, lab in zip(ch.get("text") or [],
                                                                                  ch.get("label") or [])]}}


def _boolq(r: dict) -> dict:
    return r if "answer" in r else r | {"answer": bool(r.get("label"))}


def _truthful(r: dict) -> dict:
    t = r.get("mc2_targets") or {}
    return r | {"mc2_targets": dict(zip(t.get("choices") or [], t.get("labels") or []))}


def _trivia(r: dict) -> dict:
    a = r.get("answer") or {}
    return {"Question": r.get("question"), "QuestionId": r.get("question_id"),
            "Answer": {"Value": a.get("value"), "Aliases": list(a.get("aliases") or []),
                       "NormalizedAliases": list(a.get("normalized_aliases") or [])}}


def _medqa(r: dict) -> dict:
    if "sent1" not in r:
        return r
    opts = {"ABCD"[i]: r.get(f"ending{i}") for i in range(4)}
    label = r.get("label")
    return {"question": r.get("sent1"), "options": opts,
            "answer_idx": "ABCD"[label] if isinstance(label, int) and 0 <= label < 4 else str(label)}


@dataclass(frozen=True)
class HubLayout:
    published: tuple[str, ...]    # the published layout's evaluated file(s): when one exists, the hub is not used
    eval_split: str
    configs: tuple[str, ...]
    build: Callable[[Path, list[dict], Path], list[Doc]]  # (root, records, first file) -> docs
    pool_split: str | None = None


def _simple(fn, convert=lambda r: r):
    return lambda root, recs, path: fn(path, [convert(r) for r in recs])


HUB: dict[str, HubLayout] = {
    "arc_challenge": HubLayout(("ARC-Challenge/ARC-Challenge-Test.jsonl",), "test", ("ARC-Challenge",),
                               lambda root, recs, path: B._qa_choices(path, B.ARC_LAYOUT, True,
                                                                      [_ai2(r, "question") for r in recs]), "train"),
    "arc_easy": HubLayout(("ARC-Easy/ARC-Easy-Test.jsonl",), "test", ("ARC-Easy",),
                          lambda root, recs, path: B._qa_choices(path, B.ARC_LAYOUT, True,
                                                                 [_ai2(r, "question") for r in recs]), "train"),
    "hellaswag": HubLayout(("hellaswag_val.jsonl",), "validation", (), _simple(B._hellaswag), "train"),
    "winogrande": HubLayout(("dev.jsonl", "winogrande_1.1/dev.jsonl"), "validation", ("winogrande_xl",),
                            lambda root, recs, path: B._winogrande(root, "", recs, path), "train"),
    "boolq": HubLayout(("dev.jsonl",), "validation", ("boolq",), _simple(B._boolq, _boolq), "train"),
    "piqa": HubLayout(("valid.jsonl",), "validation", (), lambda root, recs, path: B._piqa(root, "", recs, path),
                      "train"),
    "siqa": HubLayout(("dev.jsonl", "socialiqa-train-dev/dev.jsonl"), "validation", (),
                      lambda root, recs, path: B._siqa(root, "", recs, path), "train"),
    "openbookqa": HubLayout(("Data/Main/test.jsonl",), "test", ("main",),
                            lambda root, recs, path: B._qa_choices(path, B.OBQA_LAYOUT, False,
                                                                   [_ai2(r, "question_stem") for r in recs]), "train"),
    "commonsense_qa": HubLayout(("dev_rand_split.jsonl",), "validation", (),
                                lambda root, recs, path: B._csqa(path, [_ai2(r, "question") for r in recs]), "train"),
    "gsm8k": HubLayout(("test.jsonl",), "test", ("main",), lambda root, recs, path: B.load_gsm8k(root, recs, path)[0]),
    "truthfulqa_mc2": HubLayout(("data/mc_task.json", "mc_task.json"), "validation", ("multiple_choice",),
                                lambda root, recs, path: B.load_truthfulqa(root, [_truthful(r) for r in recs],
                                                                           path)[0]),
    "triviaqa": HubLayout(("qa/wikipedia-dev.json",), "validation", ("rc.nocontext", "rc", "unfiltered.nocontext"),
                          lambda root, recs, path: B._triviaqa(path, {"Data": [_trivia(r) for r in recs]}), "train"),
    "medqa": HubLayout(("data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl",
                        "questions/US/4_options/phrases_no_exclude_test.jsonl", "phrases_no_exclude_test.jsonl",
                        "test.jsonl"), "test", (),
                       lambda root, recs, path: B._medqa(root, "", [_medqa(r) for r in recs], path), "train"),
}


def _anli(root: Path, split: str) -> list[Doc]:
    recs = {f"R{i}": _need(root, f"{split}_r{i}", ("plain_text",), B.ANLI_LAYOUT) for i in (1, 2, 3)}
    return B._anli(root, split, recs)


def _mmlu(root: Path, split: str) -> list[Doc]:
    if (root / "all").is_dir() and find_split(root, split, ("all",)):
        folders = [root / "all"]
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and find_split(p, split))
    rows: dict[str, tuple[Path, list]] = {}
    for folder in folders:
        files = find_split(folder, split)
        for r in read_split(files, B.MMLU_LAYOUT):
            choices, ans = r.get("choices") or [], r.get("answer")
            if len(choices) != 4 or not isinstance(ans, int) or not 0 <= ans < 4:
                raise malformed(files[0], "", f"expected 4 choices and answer 0-3, got {r!r:.100}", B.MMLU_LAYOUT)
            subject = r.get("subject") or folder.name
            rows.setdefault(subject, (files[0], []))[1].append([r.get("question", ""), *choices, "ABCD"[ans]])
    if not rows:
        raise malformed(root, "", f"no <subject>/{split}-*.parquet files", B.MMLU_LAYOUT)
    return B._mmlu_split(root, split, dict(sorted(rows.items())))


def _math(root: Path) -> list[Doc]:
    recs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and find_split(p, "test")):
        for n, r in enumerate(read_split(find_split(folder, "test"), B.MATH_LAYOUT), 1):
            recs.append((find_split(folder, "test")[0], f"{folder.name}/{n}", r))
    return B.load_math(root, recs)[0]


def _humaneval(root: Path) -> list[Doc]:
    path, recs = _need(root, "test", ("openai_humaneval",), B.HUMANEVAL_LAYOUT)
    docs = []
    for n, r in enumerate(recs, 1):
        vals = {k: field(r, k, path, n, B.HUMANEVAL_LAYOUT, str) for k in ("task_id", "prompt", "test", "entry_point")}
        docs.append(Doc(id=vals["task_id"], text=vals["prompt"], extra=vals | {"kind": "humaneval"}))
    return docs


def _mbpp(root: Path):
    recs: list[dict] = []
    path = None
    for split in ("prompt", "test", "validation", "train"):
        files = find_split(root, split, ("full",))
        path = path or (files[0] if files else None)
        recs += read_split(files, B.MBPP_LAYOUT)
    return B.load_mbpp(root, recs, path)


def _present(root: Path, rels: tuple[str, ...]) -> bool:
    return any((root / r).is_file() for r in rels)


def load(task: Task, root: Path):
    """(eval docs, few-shot pool) from `root` in the hub layout, or None when the folder is not in it."""
    name = task.name
    if not root.is_dir():
        return None
    if name in HUB:
        h = HUB[name]
        if _present(root, h.published) or not find_split(root, h.eval_split, h.configs):
            return None
        path, recs = _need(root, h.eval_split, h.configs, task.layout)
        if name == "gsm8k":  # the pool is the fixed chain-of-thought exemplars
            return B.load_gsm8k(root, recs, path)
        docs = h.build(root, recs, path)
        if h.pool_split is None:
            return docs, []
        if name == "triviaqa" and not find_split(root, h.pool_split, h.configs):
            return docs, docs  # as the published loader: shots from the evaluated set, never the item itself

        def pool():
            p, r = _need(root, h.pool_split, h.configs, task.layout)
            return h.build(root, r, p)
        return docs, LazyDocs(pool)
    if name == "anli" and not _present(root, ("R1/test.jsonl",)) and find_split(root, "test_r1", ("plain_text",)):
        return _anli(root, "test"), LazyDocs(lambda: _anli(root, "train"))
    if name == "mmlu" and not (root / "data" / "test").is_dir() and not (root / "test").is_dir() and \
            any(find_split(p, "test") for p in root.iterdir() if p.is_dir()):
        return _mmlu(root, "test"), LazyDocs(lambda: _mmlu(root, "dev"))
    if name == "math" and not (root / "test").is_dir() and root.is_dir() and \
            any(find_split(p, "test") for p in root.iterdir() if p.is_dir()):
        return _math(root), []
    if name == "humaneval" and root.is_dir() and not _present(root, ("HumanEval.jsonl.gz", "HumanEval.jsonl")) and \
            find_split(root, "test", ("openai_humaneval",)):
        return _humaneval(root), []
    if name == "mbpp" and not _present(root, ("mbpp.jsonl",)) and find_split(root, "test", ("full",)):
        return _mbpp(root)
    return None
