"""pocketlm eval vs lm-evaluation-harness on the same tiny model, items and shots.

The model is the random `tiny` preset saved in the official Hugging Face layout with its tokenizer; lm-eval loads
it through its own `hf` backend (transformers), in a subprocess with HF_*_OFFLINE=1 and a private HF_HOME. Its
tasks are lm-eval's own task YAMLs and helper modules for HellaSwag and WinoGrande (copied from the installed
package, only `dataset_path` pointed at our fixture files), and YAMLs written in lm-eval's ARC/BoolQ formats for
the AI2/Google jsonl layouts and MMLU's header-less CSV (lm-eval's MMLU prompt, description and first_n
dev-set sampler). We assert the same prompts (so the same seeded few-shot examples), the same
per-choice log-likelihoods within 1e-4, and the same acc/acc_norm per item and overall.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from eval_helpers import DATA, boolq_yaml, run_lm_eval  # the shared lm-eval harness: tests/eval_helpers.py

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

import pocketlm  # noqa: E402
from pocketlm.eval.backends import PocketLMBackend  # noqa: E402
from pocketlm.eval.runner import evaluate  # noqa: E402
from pocketlm.eval.tasks import get_task  # noqa: E402
from pocketlm.formats.hf import save_checkpoint  # noqa: E402

LM_TASKS = Path(lm_eval.__file__).parent / "tasks"
SHOTS = {"hellaswag": 5, "winogrande": 5, "arc_challenge": 10, "boolq": 2, "mmlu": 5}


def _json_source(yaml_text: str, files: dict[str, Path]) -> str:
    lines = [ln for ln in yaml_text.splitlines() if not ln.startswith(("dataset_path:", "dataset_name:"))]
    src = "dataset_path: json\ndataset_kwargs:\n  data_files:\n" + "".join(
        f"    {split}: {path}\n" for split, path in files.items())
    return src + "\n".join(lines) + "\n"


def _write_tasks(folder: Path) -> list[Path]:
    folder.mkdir()
    (folder / "utils.py").write_text((LM_TASKS / "hellaswag" / "utils.py").read_text())
    (folder / "preprocess_winogrande.py").write_text(
        (LM_TASKS / "winogrande" / "preprocess_winogrande.py").read_text())
    hs = _json_source((LM_TASKS / "hellaswag" / "hellaswag.yaml").read_text(),
                      {"train": DATA / "hellaswag/hellaswag_train.jsonl",
                       "validation": DATA / "hellaswag/hellaswag_val.jsonl"})
    wg = _json_source((LM_TASKS / "winogrande" / "default.yaml").read_text(),
                      {"train": DATA / "winogrande/winogrande_1.1/train_xl.jsonl",
                       "validation": DATA / "winogrande/winogrande_1.1/dev.jsonl"})
    arc = DATA / "arc/ARC-Challenge"
    arc_yaml = textwrap.dedent(f"""\
        task: pl_arc_challenge
        dataset_path: json
        dataset_kwargs:
          data_files:
            train: {arc / 'ARC-Challenge-Train.jsonl'}
            test: {arc / 'ARC-Challenge-Test.jsonl'}
        output_type: multiple_choice
        training_split: train
        test_split: test
        doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
        doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
        doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """)
    mmlu = DATA / "mmlu/data"
    mmlu_yaml = textwrap.dedent(f"""\
        task: pl_mmlu
        dataset_path: csv
        dataset_kwargs:
          data_files:
            test: {mmlu / 'test/astronomy_test.csv'}
            dev: {mmlu / 'dev/astronomy_dev.csv'}
          column_names: [question, A, B, C, D, answer]
        output_type: multiple_choice
        test_split: test
        fewshot_split: dev
        fewshot_config:
          sampler: first_n
        description: "The following are multiple choice questions (with answers) about astronomy.\\n\\n"
        doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
        doc_to_choice: ["A", "B", "C", "D"]
        doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """)
    paths = {"hellaswag": hs.replace("task: hellaswag", "task: pl_hellaswag"),
             "winogrande": wg.replace("task: winogrande", "task: pl_winogrande"),
             "arc_challenge": arc_yaml, "boolq": boolq_yaml("pl_boolq"), "mmlu": mmlu_yaml}
    out = []
    for name, text in paths.items():
        (folder / f"{name}.yaml").write_text(text)
        out.append(folder / f"{name}.yaml")
    return out


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    model = pocketlm.load("tiny", seed=3)
    tok = pocketlm.Tokenizer.default()
    save_checkpoint(model, tmp / "model", tokenizer=tok)
    yamls = _write_tasks(tmp / "tasks")
    theirs = run_lm_eval(tmp / "model", {f"pl_{p.stem}": (p, SHOTS[p.stem], "") for p in yamls}, tmp)
    ours_model = pocketlm.load(tmp / "model")
    backend = PocketLMBackend(ours_model, pocketlm.Tokenizer.from_pretrained(tmp / "model"))
    astronomy = tmp / "mmlu_astronomy"  # the subject lm-eval's YAML reads
    for split in ("test", "dev"):
        (astronomy / "data" / split).mkdir(parents=True)
        shutil.copy(DATA / f"mmlu/data/{split}/astronomy_{split}.csv", astronomy / "data" / split)
    ours = {}
    for name in SHOTS:
        over = {"mmlu": astronomy} if name == "mmlu" else None
        ours[name] = evaluate(backend, [get_task(name)], data_dir=DATA, overrides=over, shots=SHOTS[name],
                              progress=False)
    return theirs, ours


@pytest.mark.slow  # ~45 s: lm-eval and transformers load in a subprocess
@pytest.mark.parametrize("name", list(SHOTS))
def test_same_prompts_loglikelihoods_and_accuracy(harness_run, name):
    theirs, ours = harness_run
    t, o = theirs[f"pl_{name}"], ours[name]
    rows = o["samples"][name]
    assert len(rows) == len(t["samples"]) > 0
    for row, s in zip(rows, t["samples"]):
        contexts = [a[0] for a in s["args"]]
        conts = [a[1] for a in s["args"]]
        if isinstance(row["prompt"], list):  # WinoGrande: one context per option, one continuation
            assert row["prompt"] == contexts
            assert all(c == " " + row["continuation"] for c in conts)
        else:
            assert all(c == row["prompt"] for c in contexts), (row["prompt"][:300], contexts[0][:300])
        assert row["loglikelihoods"] == pytest.approx(s["lls"], abs=1e-4)
        assert row["scores"]["acc"] == s["acc"]
        if "acc_norm" in row["scores"] and s["acc_norm"] is not None:
            assert row["scores"]["acc_norm"] == s["acc_norm"]
    res = o["results"][name]["metrics"]
    for metric in ("acc", "acc_norm"):
        key = f"{metric},none"
        if key in t["results"]:
            assert res[metric]["mean"] == pytest.approx(t["results"][key], abs=1e-12)
            assert res[metric]["stderr"] == pytest.approx(t["results"][f"{metric}_stderr,none"], abs=1e-9)
