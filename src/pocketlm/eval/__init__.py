"""Evaluation: the Phi-3 report's benchmark suite, scored as lm-evaluation-harness scores it.

Modules: `tasks` (task format, registry), `benchmarks` (one loader + task per benchmark), `data` (file readers
and data errors), `prompts` (few-shot sampling and prompt text), `scoring` (metrics, answer extraction),
`sandbox` (running generated code), `backends` (pocketlm model / OpenAI-compatible endpoint), `runner`
(evaluate), `report` (table, JSON, chart), `contamination` (13-gram overlap), `commands` (`pocketlm eval`),
`bos` (the --add-bos rule), `hub` (the Hugging Face hub copies of the benchmarks), `judge` (a cached judge
endpoint), `mtbench` (MT-bench, FastChat's single-answer grading), `safety` (refusal and over-refusal).
"""

from pocketlm.eval.runner import evaluate
from pocketlm.eval.tasks import Doc, Task, all_tasks, get_task, resolve_tasks

__all__ = ["evaluate", "Doc", "Task", "all_tasks", "get_task", "resolve_tasks"]
