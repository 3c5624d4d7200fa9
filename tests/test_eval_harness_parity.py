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

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

import pocketlm  # noqa: E402
from pocketlm.eval.backends import PocketLMBackend  # noqa: E402
from pocketlm.eval.runner import evaluate  # noqa: E402
from pocketlm.eval.tasks import get_task  # noqa: E402
from pocketlm.formats.hf import save_checkpoint  # noqa: E402

DATA = Path(__file__).parent / "data" / "eval"
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
    boolq_yaml = textwrap.dedent(f"""\
        task: pl_boolq
        dataset_path: json
        dataset_kwargs:
          data_files:
            train: {DATA / 'boolq/train.jsonl'}
            validation: {DATA / 'boolq/dev.jsonl'}
        output_type: multiple_choice
        training_split: train
        validation_split: validation
        doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
        doc_to_choice: ["no", "yes"]
        doc_to_target: "{{{{ 1 if answer else 0 }}}}"
        metric_list:
          - metric: acc
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
             "arc_challenge": arc_yaml, "boolq": boolq_yaml, "mmlu": mmlu_yaml}
    out = []
    for name, text in paths.items():
        (folder / f"{name}.yaml").write_text(text)
        out.append(folder / f"{name}.yaml")
    return out


RUNNER = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
model_dir, out, *specs = sys.argv[1:]
results = {}
for spec in specs:
    path, shots = spec.rsplit("=", 1)
    r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=[path],
                                num_fewshot=int(shots), task_manager=TaskManager(), log_samples=True,
                                batch_size=4, device="cpu", random_seed=0, numpy_random_seed=0,
                                torch_random_seed=0, fewshot_random_seed=1234)
    (name,) = r["results"]
    samples = sorted(r["samples"][name], key=lambda s: s["doc_id"])
    results[name] = {"results": r["results"][name],
                     "samples": [{"doc_id": s["doc_id"], "args": [a for a in s["arguments"]],
                                  "lls": [x[0][0] for x in s["resps"]], "acc": s.get("acc"),
                                  "acc_norm": s.get("acc_norm")} for s in samples]}
json.dump(results, open(out, "w"))
"""


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    model = pocketlm.load("tiny", seed=3)
    tok = pocketlm.Tokenizer.default()
    save_checkpoint(model, tmp / "model", tokenizer=tok)
    yamls = _write_tasks(tmp / "tasks")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp / "hf_home"), TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    specs = [f"{p}={SHOTS[p.stem]}" for p in yamls]
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "model"), str(tmp / "lm.json"), *specs],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = json.loads((tmp / "lm.json").read_text())
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
