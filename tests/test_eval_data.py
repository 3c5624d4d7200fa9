"""Every benchmark reads its published layout (fixtures under tests/data/eval); bad files give clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pocketlm.eval.data import EvalDataError
from pocketlm.eval.prompts import FewshotSampler, build_prompt, letter_text
from pocketlm.eval.runner import load_docs
from pocketlm.eval.tasks import all_tasks, get_task, resolve_tasks

DATA = Path(__file__).parent / "data" / "eval"
PAPER_ROWS = {"MMLU", "HellaSwag", "ANLI", "GSM-8K", "MATH", "MedQA", "AGIEval", "TriviaQA", "Arc-C", "Arc-E",
              "PIQA", "SociQA", "BigBench-Hard", "WinoGrande", "OpenBookQA", "BoolQ", "CommonSenseQA",
              "TruthfulQA (MC2)", "HumanEval", "MBPP", "GPQA"}


def test_registry_covers_every_row_of_the_paper_table():
    assert {t.title for t in all_tasks()} == PAPER_ROWS
    shots = {t.name: t.shots for t in all_tasks()}
    assert shots | {} == {"mmlu": 5, "hellaswag": 5, "anli": 7, "gsm8k": 8, "math": 0, "medqa": 2, "agieval": 0,
                          "triviaqa": 5, "arc_challenge": 10, "arc_easy": 10, "piqa": 5, "siqa": 5, "bbh": 3,
                          "winogrande": 5, "openbookqa": 10, "boolq": 2, "commonsense_qa": 10,
                          "truthfulqa_mc2": 0, "humaneval": 0, "mbpp": 3, "gpqa": 2}
    assert get_task("mmlu").paper_scores["phi-3-mini"] == 68.8
    assert len(resolve_tasks("paper")) == 20 and len(resolve_tasks("all")) == 21


@pytest.mark.parametrize("task", [t.name for t in all_tasks()])
def test_each_fixture_loads_in_its_published_layout(task):
    t = get_task(task)
    docs, pool = load_docs(t, DATA)
    assert docs
    for d in docs:
        if t.kind == "mc":
            assert d.text and len(d.choices) >= 2 and 0 <= d.gold < len(d.choices)
        elif t.kind == "gen":
            assert d.text and d.answers
        elif t.kind == "code":
            assert d.extra["test"]
    if t.shots and not t.embedded_shots:
        assert len(pool) >= 1


def test_specific_items_parse_as_published():
    docs, dev = load_docs(get_task("mmlu"), DATA)
    assert docs[0].text.startswith("What is the closest star") and docs[0].gold == 1 and docs[0].group == "astronomy"
    assert "Dev question 0, with a comma?" in dev[0].text  # CSV quoting survives
    hs, _ = load_docs(get_task("hellaswag"), DATA)
    assert hs[1].text == "Baking cookies: A woman. mixes flour and sugar in a bowl. She"  # lm-eval preprocess
    gsm, shots = load_docs(get_task("gsm8k"), DATA)
    assert gsm[1].answers == ["2000"] and len(shots) == 8
    arc, _ = load_docs(get_task("arc_challenge"), DATA)
    assert arc[2].choices == ["four", "six", "eight"] and arc[2].gold == 1  # numeric answer keys
    math_docs, _ = load_docs(get_task("math"), DATA)
    assert math_docs[1].answers == ["\\frac{1}{2}"]
    mbpp, mbpp_shots = load_docs(get_task("mbpp"), DATA)
    assert [d.id for d in mbpp] == ["mbpp/11", "mbpp/12"] and [d.id for d in mbpp_shots] == [f"mbpp/{i}" for i in
                                                                                                (2, 3, 4)]
    wg, _ = load_docs(get_task("winogrande"), DATA)
    assert wg[0].choices[0].endswith("so Sarah") and wg[0].target == "always got the harder cases."
    tq, _ = load_docs(get_task("triviaqa"), DATA)
    assert "Sunset Blvd" in tq[0].answers
    gp1, _ = load_docs(get_task("gpqa"), DATA)
    gp2, _ = load_docs(get_task("gpqa"), DATA)
    assert [d.options for d in gp1] == [d.options for d in gp2]  # fixed shuffle
    assert all(d.options[d.gold] in ("Triplet", "Photon", "O(log n)") for d in gp1)


def _copy(tmp_path: Path, folder: str) -> Path:
    shutil.copytree(DATA / folder, tmp_path / folder)
    return tmp_path


def test_missing_file_names_the_file_and_layout(tmp_path):
    with pytest.raises(EvalDataError) as e:
        load_docs(get_task("hellaswag"), tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "hellaswag" / "hellaswag_val.jsonl") in msg and "expected layout" in msg and "ctx_a" in msg
    with pytest.raises(EvalDataError, match="no data folder given"):
        load_docs(get_task("boolq"), None)


def test_malformed_files_name_the_file_record_and_layout(tmp_path):
    root = _copy(tmp_path, "boolq")
    (root / "boolq" / "dev.jsonl").write_text('{"question": "q", "passage": "p", "answer": true}\n{broken\n')
    with pytest.raises(EvalDataError, match=r"dev\.jsonl line 2: not valid JSON.*expected layout"):
        load_docs(get_task("boolq"), root)
    (root / "boolq" / "dev.jsonl").write_text('{"question": "q", "passage": "p"}\n')
    with pytest.raises(EvalDataError, match=r"dev\.jsonl record 1: missing field 'answer'"):
        load_docs(get_task("boolq"), root)
    root = _copy(tmp_path, "piqa")
    (root / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(EvalDataError, match=r"valid-labels\.lst: 1 labels for 3 records"):
        load_docs(get_task("piqa"), root)
    root = _copy(tmp_path, "mmlu")
    (root / "mmlu" / "data" / "test" / "astronomy_test.csv").write_text("only,three,columns\n")
    with pytest.raises(EvalDataError, match=r"astronomy_test\.csv row 1: expected 6 columns"):
        load_docs(get_task("mmlu"), root)
    root = _copy(tmp_path, "arc")
    p = root / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    rec = json.loads(p.read_text().splitlines()[0]) | {"answerKey": "Z"}
    p.write_text(json.dumps(rec) + "\n")
    with pytest.raises(EvalDataError, match="answerKey 'Z' not among labels"):
        load_docs(get_task("arc_easy"), root)
    root = _copy(tmp_path, "triviaqa")
    (root / "triviaqa" / "qa" / "wikipedia-dev.json").write_text('{"Version": 1}')
    with pytest.raises(EvalDataError, match="no \"Data\" list"):
        load_docs(get_task("triviaqa"), root)


def test_sampler_is_seeded_and_never_returns_the_item_itself():
    docs, _ = load_docs(get_task("gpqa"), DATA)  # the pool is the evaluated set
    s1 = FewshotSampler(docs, "random", 1234, same_as_eval=True)
    s2 = FewshotSampler(docs, "random", 1234, same_as_eval=True)
    for d in docs:
        a, b = s1.sample(2, d), s2.sample(2, d)
        assert [x.id for x in a] == [x.id for x in b] and d not in a and len(a) == 2
    mmlu, dev = load_docs(get_task("mmlu"), DATA)
    first = FewshotSampler(dev, "first_n").sample(5, mmlu[-1])
    assert {x.group for x in first} == {mmlu[-1].group} and len(first) == 5  # same subject, in file order


def test_prompt_formats():
    t = get_task("arc_easy")
    docs, pool = load_docs(t, DATA)
    p = build_prompt(t, docs[0], pool[:2])
    assert p.count("Question:") == 3 and p.endswith(docs[0].text)
    assert pool[0].text + " " + pool[0].choices[pool[0].gold] + "\n\n" in p
    letter = build_prompt(t, docs[0], pool[:2], fmt="letter")
    assert letter.endswith(letter_text(docs[0])) and "Options:\nA. luster\nB. mass" in letter
    assert "\nAnswer: " + "ABCD"[pool[0].gold] + "\n\n" in letter
    chat = build_prompt(t, docs[0], [], chat=True)
    assert chat == [{"role": "user", "content": docs[0].text}]
    mmlu = get_task("mmlu")
    mdocs, dev = load_docs(mmlu, DATA)
    assert build_prompt(mmlu, mdocs[0], []).startswith(
        "The following are multiple choice questions (with answers) about astronomy.\n\n")
