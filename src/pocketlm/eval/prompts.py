"""Few-shot prompt construction: which examples (a seeded sampler) and how they are joined.

The sampler reproduces lm-evaluation-harness's `ContextSampler` (v0.4): one `random.Random(seed)` per task
(default seed 1234, lm-eval's `fewshot_random_seed`), drawing `rnd.sample(pool, n)` for each evaluated item in
order; when the pool is the evaluated set itself it draws n + 1 and drops the item. lm-eval also draws n + 1
(and drops nothing, the item being from another split) for every task whose config has no `test_split`, i.e.
that is evaluated on its validation split (`fewshot_split == test_split`, both None, in `fewshot_context`):
`Task.lm_eval_draw_extra` marks those tasks so that the same examples come out. `first_n` takes the first n
(MMLU: dev examples of the same subject), `fixed` takes the pool in order (GSM-8K CoT exemplars, MBPP tasks 2-4).

A prompt is `description + Σ(shot.text + target_delimiter + shot.target + fewshot_delimiter) + doc.text`, as
lm-eval's `fewshot_context` without a chat template. With `chat=True` (instruct models) that whole string is the
single user message of a conversation (lm-eval's `apply_chat_template` without `fewshot_as_multiturn`); the
backend renders it in the model's Phi-3 chat format and the answer follows `<|assistant|>`.

The paper's letter format (Appendix A): "Question: ...\nOptions:\nA. ...\nB. ...\nAnswer: A".
"""

from __future__ import annotations

import random
from typing import Sequence

from pocketlm.eval.tasks import Doc, Task

LETTERS = "ABCDEFGHIJ"
DEFAULT_SEED = 1234


class FewshotSampler:
    def __init__(self, pool: Sequence[Doc], kind: str = "random", seed: int = DEFAULT_SEED, same_as_eval=False,
                 draw_extra: bool = False):
        self.pool, self.kind, self.same_as_eval, self.draw_extra = list(pool), kind, same_as_eval, draw_extra
        self.rnd = random.Random(seed)

    def sample(self, n: int, doc: Doc) -> list[Doc]:
        if n == 0:
            return []
        pool = self.pool
        if doc.group and any(d.group for d in pool):
            pool = [d for d in pool if d.group == doc.group]
        if self.kind in ("first_n", "fixed"):
            pool = [d for d in pool if d is not doc]
            return pool[:n]
        if not (self.same_as_eval or self.draw_extra):
            return self.rnd.sample(pool, min(n, len(pool)))
        got = [d for d in self.rnd.sample(pool, min(n + 1, len(pool))) if d is not doc][:n]
        return got


def letter_text(doc: Doc) -> str:
    return f"Question: {doc.question.strip()}\nOptions:\n" + \
        "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(doc.options)) + "Answer:"


def shot_parts(task: Task, doc: Doc, fmt: str) -> tuple[str, str]:
    """(text, target) of a doc when it serves as a few-shot example."""
    if fmt == "letter":
        return letter_text(doc), LETTERS[doc.gold]  # type: ignore[index]
    if task.kind == "mc_partial":
        return doc.choices[doc.gold], doc.target  # type: ignore[index]
    if task.kind == "mc":
        return doc.text, doc.choices[doc.gold]  # type: ignore[index]
    return doc.text, doc.target


def build_prompt(task: Task, doc: Doc, shots: Sequence[Doc], *, fmt: str = "default", chat: bool = False,
                 text: str | None = None):
    """The full prompt for `doc` (its own text replaced by `text` for mc_partial contexts)."""
    tdelim = " " if fmt == "letter" else task.target_delimiter
    parts = [task.describe(doc) if fmt != "letter" else ""]
    for s in shots:
        q, a = shot_parts(task, s, fmt)
        parts.append(q + tdelim + a + task.fewshot_delimiter)
    own = letter_text(doc) if fmt == "letter" else (doc.text if text is None else text)
    prompt = "".join(parts) + own
    return [{"role": "user", "content": prompt}] if chat else prompt
