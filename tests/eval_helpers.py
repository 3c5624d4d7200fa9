"""What the comparisons with lm-evaluation-harness share (tests/test_eval_harness_parity.py, tests/test_eval_runs.py):
the fixture data, task YAMLs in lm-eval's own formats pointed at it, and lm-eval itself run in a subprocess
(offline: HF_*_OFFLINE=1 and a private HF_HOME) on a checkpoint folder through its `hf` (transformers) backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

DATA = Path(__file__).parent / "data" / "eval"


def boolq_yaml(task: str) -> str:
    """An lm-eval task named `task` in lm-eval's BoolQ format (its prompt, choices and target) on the fixture's
    BoolQ jsonl files."""
    return textwrap.dedent(f"""\
        task: {task}
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


RUNNER = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
model_dir, spec_file, out = sys.argv[1:]
results = {}
for label, (path, shots, extra) in json.load(open(spec_file)).items():
    r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32{extra}", tasks=[path],
                                num_fewshot=shots, task_manager=TaskManager(), log_samples=True,
                                batch_size=4, device="cpu", random_seed=0, numpy_random_seed=0,
                                torch_random_seed=0, fewshot_random_seed=1234)
    (name,) = r["results"]
    samples = sorted(r["samples"][name], key=lambda s: s["doc_id"])
    results[label] = {"results": r["results"][name],
                      "samples": [{"doc_id": s["doc_id"], "args": [a for a in s["arguments"]],
                                   "lls": [x[0][0] for x in s["resps"]], "acc": s.get("acc"),
                                   "acc_norm": s.get("acc_norm")} for s in samples]}
json.dump(results, open(out, "w"))
"""


def run_lm_eval(model_dir: Path, specs: dict[str, tuple[Path, int, str]], tmp: Path) -> dict:
    """`lm_eval.simple_evaluate(model="hf", ...)` in a subprocess, once per label -> (task YAML, shots, extra hf
    model_args such as ",add_bos_token=False").

    Returns: label -> {"results": the task's metrics, "samples": [{"doc_id", "args", "lls", "acc", "acc_norm"}]
    ordered by doc_id}.
    """
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp / "hf_home"), TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    spec_file, out = tmp / "lm_eval_specs.json", tmp / "lm_eval_out.json"
    spec_file.write_text(json.dumps({k: [str(p), shots, extra] for k, (p, shots, extra) in specs.items()}))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(model_dir), str(spec_file), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
