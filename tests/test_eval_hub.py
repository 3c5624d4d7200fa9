"""The Hugging Face hub copies of each benchmark (Parquet shards, or the hub's JSON lines) give the same items as
the published files: each fixture under tests/data/eval is rewritten here in its hub dataset's field layout,
written as small Parquet files, and loaded both ways."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pocketlm.eval.data import EvalDataError
from pocketlm.eval.runner import load_docs, prepare
from pocketlm.eval.tasks import get_task

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DATA = Path(__file__).parent / "data" / "eval"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _parquet(path: Path, recs: list[dict], shards: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    step = -(-len(recs) // shards)
    for i in range(shards):
        part = recs[i * step:(i + 1) * step]
        name = path.name.replace("SHARD", f"{i:05d}-of-{shards:05d}")
        pq.write_table(pa.Table.from_pylist(part), path.parent / name)


def _ai2(r: dict, stem_key: str) -> dict:
    q = r["question"]
    return {"id": r["id"], stem_key: q["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}


def _labels(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def build_hub(task: str, root: Path) -> None:
    """Write `task`'s fixture into `root` in its hub dataset's layout."""
    d = DATA / get_task(task).folder
    if task in ("arc_challenge", "arc_easy"):
        name = "ARC-Challenge" if task == "arc_challenge" else "ARC-Easy"
        for split, f in (("test", "Test"), ("train", "Train")):
            _parquet(root / name / f"{split}-SHARD.parquet", [_ai2(r, "question") for r in
                                                               _jsonl(d / name / f"{name}-{f}.jsonl")], shards=2)
    elif task == "hellaswag":
        for split, f in (("validation", "val"), ("train", "train")):
            _parquet(root / "data" / f"{split}-SHARD.parquet",
                     [r | {"label": str(r["label"])} for r in _jsonl(d / f"hellaswag_{f}.jsonl")])
    elif task == "winogrande":
        for split, f in (("validation", "dev"), ("train", "train_xl")):
            _parquet(root / "winogrande_xl" / f"{split}-SHARD.parquet",
                     [r | {"answer": str(r["answer"])} for r in _jsonl(d / "winogrande_1.1" / f"{f}.jsonl")])
    elif task == "boolq":  # super_glue's layout: label 0/1, idx
        for split, f in (("validation", "dev"), ("train", "train")):
            _parquet(root / "boolq" / f"{split}-SHARD.parquet",
                     [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                      for i, r in enumerate(_jsonl(d / f"{f}.jsonl"))])
    elif task == "piqa":
        for split, f in (("validation", "valid"), ("train", "train")):
            recs, labels = _jsonl(d / f"{f}.jsonl"), _labels(d / f"{f}-labels.lst")
            _parquet(root / f"{split}-SHARD.parquet", [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"],
                                                        "label": y} for r, y in zip(recs, labels)])
    elif task == "siqa":
        base = d / "socialiqa-train-dev"
        for split, f in (("validation", "dev"), ("train", "train")):
            recs, labels = _jsonl(base / f"{f}.jsonl"), _labels(base / f"{f}-labels.lst")
            _parquet(root / "data" / f"{split}-SHARD.parquet", [r | {"label": str(y)} for r, y in zip(recs, labels)])
    elif task == "openbookqa":
        for split in ("test", "train"):
            _parquet(root / "main" / f"{split}-SHARD.parquet",
                     [_ai2(r, "question_stem") for r in _jsonl(d / "Data" / "Main" / f"{split}.jsonl")])
    elif task == "commonsense_qa":
        for split, f in (("validation", "dev"), ("train", "train")):
            _parquet(root / "data" / f"{split}-SHARD.parquet",
                     [_ai2(r, "question") | {"question_concept": r["question"].get("question_concept", "")}
                      for r in _jsonl(d / f"{f}_rand_split.jsonl")])
    elif task == "mmlu":  # cais/mmlu: one folder per subject
        for split in ("test", "dev"):
            for f in sorted((d / "data" / split).glob("*.csv")):
                subject = f.name[: -len(f"_{split}.csv")]
                rows = list(csv.reader(f.open()))
                _parquet(root / subject / f"{split}-SHARD.parquet",
                         [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                          for r in rows])
    elif task == "anli":
        for rnd in ("1", "2", "3"):
            for split in ("test", "train"):
                _parquet(root / "plain_text" / f"{split}_r{rnd}-SHARD.parquet",
                         [r | {"label": {"e": 0, "n": 1, "c": 2}.get(r["label"], r["label"]), "reason": ""}
                          for r in _jsonl(d / f"R{rnd}" / f"{split}.jsonl")])
    elif task == "gsm8k":
        _parquet(root / "main" / "test-SHARD.parquet", _jsonl(d / "test.jsonl"))
    elif task == "math":
        for sub in sorted((d / "test").iterdir()):
            files = sorted(sub.glob("*.json"), key=lambda p: int(p.stem))
            _parquet(root / sub.name / "test-SHARD.parquet", [json.loads(p.read_text()) for p in files])
    elif task == "medqa":  # GBaker/MedQA-USMLE-4-options-hf
        base = d / "data_clean" / "questions" / "US" / "4_options"
        for split in ("test", "train"):
            recs = _jsonl(base / f"phrases_no_exclude_{split}.jsonl")
            _parquet(root / f"{split}-SHARD.parquet",
                     [{"id": str(i), "sent1": r["question"], "sent2": "", "label": "ABCD".index(r["answer_idx"]),
                       **{f"ending{k}": r["options"]["ABCD"[k]] for k in range(4)}} for i, r in enumerate(recs)])
    elif task == "triviaqa":
        for split, f in (("validation", "dev"), ("train", "train")):
            data = json.loads((d / "qa" / f"wikipedia-{f}.json").read_text())["Data"]
            _parquet(root / "rc.nocontext" / f"{split}-SHARD.parquet",
                     [{"question": r["Question"], "question_id": r["QuestionId"], "question_source": "",
                       "answer": {"value": r["Answer"]["Value"], "aliases": r["Answer"]["Aliases"],
                                  "normalized_aliases": r["Answer"]["NormalizedAliases"]}} for r in data])
    elif task == "truthfulqa_mc2":
        data = json.loads((d / "data" / "mc_task.json").read_text())
        _parquet(root / "multiple_choice" / "validation-SHARD.parquet",
                 [{"question": r["question"],
                   "mc1_targets": {"choices": list(r["mc1_targets"]), "labels": list(r["mc1_targets"].values())},
                   "mc2_targets": {"choices": list(r["mc2_targets"]), "labels": list(r["mc2_targets"].values())}}
                  for r in data])
    elif task == "humaneval":
        _parquet(root / "openai_humaneval" / "test-SHARD.parquet", _jsonl(d / "HumanEval.jsonl"))
    elif task == "mbpp":
        recs = _jsonl(d / "mbpp.jsonl")
        for split, lo, hi in (("prompt", 1, 10), ("test", 11, 510), ("validation", 511, 600), ("train", 601, 974)):
            part = [r | {"challenge_test_list": []} for r in recs if lo <= r["task_id"] <= hi]
            if part:
                _parquet(root / "full" / f"{split}-SHARD.parquet", part)
    else:  # pragma: no cover
        raise AssertionError(task)


HUB_TASKS = ["arc_challenge", "arc_easy", "hellaswag", "winogrande", "boolq", "piqa", "siqa", "openbookqa",
             "commonsense_qa", "mmlu", "anli", "gsm8k", "math", "medqa", "triviaqa", "truthfulqa_mc2", "humaneval",
             "mbpp"]


def _key(d):
    return (d.text, d.choices, d.gold, d.target, d.answers, d.labels, d.question, d.options, d.group,
            {k: v for k, v in d.extra.items() if k != "level"})


@pytest.mark.parametrize("task", HUB_TASKS)
def test_hub_copy_gives_the_published_items(task, tmp_path):
    t = get_task(task)
    build_hub(task, tmp_path / t.folder)
    assert not list((tmp_path / t.folder).rglob("*.jsonl")) and list((tmp_path / t.folder).rglob("*.parquet"))
    ref_docs, ref_pool = load_docs(t, DATA)
    docs, pool = load_docs(t, tmp_path)
    assert [_key(d) for d in docs] == [_key(d) for d in ref_docs]
    assert [_key(d) for d in pool] == [_key(d) for d in ref_pool]
    assert (pool is docs) == (ref_pool is ref_docs)
    (a,), (b,) = prepare([t], DATA), prepare([t], tmp_path)
    assert (a.shots, a.requested) == (b.shots, b.requested)


def test_hub_json_lines_layout_and_zero_shot_without_train(tmp_path):
    root = tmp_path / "boolq"
    root.mkdir()
    recs = [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
            for i, r in enumerate(_jsonl(DATA / "boolq" / "dev.jsonl"))]
    (root / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    docs, _ = load_docs(get_task("boolq"), tmp_path)
    ref, _ = load_docs(get_task("boolq"), DATA)
    assert [_key(d) for d in docs] == [_key(d) for d in ref]
    (p,) = prepare([get_task("boolq")], tmp_path, shots=0)  # no train split: fine for 0 shots
    assert p.shots == 0
    with pytest.raises(EvalDataError, match="no 'train' split in the hub layout"):
        prepare([get_task("boolq")], tmp_path, shots=1)


def test_hub_records_are_checked_like_published_ones(tmp_path):
    build_hub("arc_easy", tmp_path / "arc")
    bad = tmp_path / "arc" / "ARC-Easy"
    for f in bad.glob("test-*.parquet"):
        f.unlink()
    _parquet(bad / "test-SHARD.parquet", [{"id": "x", "question": "q?", "answerKey": "Z",
                                           "choices": {"text": ["a", "b"], "label": ["A", "B"]}}])
    with pytest.raises(EvalDataError, match=r"test-00000-of-00001\.parquet record 1: answerKey 'Z'"):
        load_docs(get_task("arc_easy"), tmp_path)
