"""The task format and the registry of every benchmark in the Phi-3 report's academic table (phi3-spec.md §6.1).

A `Task` says how to read a benchmark (a loader over its published file layout, see `benchmarks.py`), how to turn
an item into a prompt (`Doc.text`, the few-shot delimiters, the description), how to score it (`kind`), its
paper shot count and the paper's published numbers. An item is a `Doc`, the same shape for every benchmark.

Kinds:
- "mc": multiple choice by log-likelihood of each continuation `target_delimiter + choice` after the prompt
  (lm-evaluation-harness `output_type: multiple_choice`; metrics acc, acc_norm).
- "mc_partial": WinoGrande's partial scoring: one continuation, one context per option (lm-eval
  `multiple_input`); metric acc.
- "mc2": TruthfulQA MC2, the normalised probability mass on the true answers.
- "gen": greedy generation until a stop string, then answer extraction and exact match (GSM-8K, MATH, BBH,
  TriviaQA, GPQA).
- "code": greedy generation, then the program runs in the sandbox (HumanEval, MBPP); pass@1.
Any "mc" task whose items carry `question`/`options` can instead use the paper's letter format
("Question: ... Options: A. ... Answer:"), scored by greedy decoding at temperature 0 (`--format letter`).

Deviations from the paper, which used Microsoft-internal prompts that are not published: prompts here are
lm-evaluation-harness's (so that numbers compare with what the field reports), the paper's shot counts are kept;
see each task's `notes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Paper table (phi3-spec.md §6.1, later revision): columns in order.
PAPER_COLUMNS = ("phi-3-mini", "phi-3-small", "phi-3-medium", "phi-2", "mistral-7b", "gemma-7b", "llama-3-in-8b",
                 "mixtral-8x7b", "gpt-3.5-1106")


@dataclass
class Doc:
    """One benchmark item, normalised. Fields a task does not use stay empty."""
    id: str
    text: str = ""                     # the prompt for this item, without few-shot examples
    choices: list[str] = field(default_factory=list)   # mc: continuations; mc_partial: contexts
    gold: int | list[int] = 0          # index (or indices) of the right choice
    target: str = ""                   # what follows `text` when this item is a few-shot example
    answers: list[str] = field(default_factory=list)   # gen: acceptable answers (already normalised forms)
    labels: list[int] = field(default_factory=list)    # mc2: 1 = true answer
    question: str = ""                 # letter format: the bare question
    options: list[str] = field(default_factory=list)   # letter format: option texts
    group: str = ""                    # few-shot examples come from the same group (MMLU subject, BBH task)
    extra: dict = field(default_factory=dict)          # code: prompt/test/entry_point; raw fields for logs


@dataclass(frozen=True)
class Task:
    name: str                 # registry key (`--tasks`)
    title: str                # the row in the paper's table
    kind: str                 # mc | mc_partial | mc2 | gen | code
    shots: int                # the paper's shot count
    folder: str               # sub-folder of --data-dir that holds the benchmark's files
    layout: str               # the published layout, shown in every data error
    load: Callable[[Path], tuple[list[Doc], list[Doc]]]  # root -> (eval docs, few-shot pool)
    metric: str               # the headline metric
    paper: tuple[float | None, ...] = ()  # published numbers, PAPER_COLUMNS order
    sampler: str = "random"   # random (lm-eval default, seed 1234) | first_n | fixed (pool used in order)
    description: Callable[[Doc], str] | str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop: tuple[str, ...] = ()
    max_tokens: int = 256
    extract: Callable[[str, Doc], str | None] | None = None   # gen: completion -> answer (None: no answer)
    check: Callable[[str, Doc], bool] | None = None            # gen: is the extracted answer right
    lm_eval_draw_extra: bool = False  # lm-eval samples n + 1 shots (config without test_split), see prompts.py
    embedded_shots: bool = False  # the shots are part of every item's text (BBH)
    notes: str = ""

    def describe(self, doc: Doc) -> str:
        return self.description(doc) if callable(self.description) else self.description

    @property
    def paper_scores(self) -> dict[str, float]:
        return {c: v for c, v in zip(PAPER_COLUMNS, self.paper) if v is not None}


REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    assert task.name not in REGISTRY, task.name
    assert task.kind in ("mc", "mc_partial", "mc2", "gen", "code"), task.kind
    REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    from pocketlm.eval import benchmarks  # noqa: F401  (fills REGISTRY)
    from pocketlm.eval.data import EvalDataError
    if name not in REGISTRY and name.startswith("heldout-"):
        # the held-out sets of the data-quality experiment (eval/heldout.py): by name only, never in paper/all
        from pocketlm.eval.heldout import TASKS as HELDOUT
        for task in HELDOUT:
            if task.name == name:
                return task
    if name not in REGISTRY and name == "simple-qa":  # chat quality (eval/simple_qa.py): by name, not in paper/all
        from pocketlm.eval.simple_qa import TASK as SIMPLE_QA
        return SIMPLE_QA
    if name not in REGISTRY and name == "scienceqa-img":  # images (eval/vision_tasks.py): by name, not in paper/all
        from pocketlm.eval.vision_tasks import TASK as SCIENCEQA_IMG
        return SCIENCEQA_IMG
    if name not in REGISTRY:
        raise EvalDataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(REGISTRY))} (and "
                            "heldout-arith, heldout-cloze, simple-qa, scienceqa-img)")
    return REGISTRY[name]


def all_tasks() -> list[Task]:
    from pocketlm.eval import benchmarks  # noqa: F401
    return list(REGISTRY.values())


def resolve_tasks(spec: str) -> list[Task]:
    """'a,b' -> tasks; 'all' -> every task; 'paper' -> the 20 averaged rows (not GPQA)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    out: list[Task] = []
    for n in names:
        if n in ("all", "paper"):
            out += [t for t in all_tasks() if n == "all" or t.name != "gpqa"]
        else:
            out.append(get_task(n))
    seen: set[str] = set()
    return [t for t in out if not (t.name in seen or seen.add(t.name))]
