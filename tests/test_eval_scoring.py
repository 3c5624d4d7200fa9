"""Metrics and answer extraction on known-good and known-bad completions."""

from __future__ import annotations

import math

import pytest

from pocketlm.eval import scoring
from pocketlm.eval.tasks import Doc


def test_acc_and_acc_norm_follow_lm_eval():
    # choice 1 has the higher total log-likelihood, choice 0 the higher per-character one
    lls, choices = [-6.0, -5.0], ["a long answer", "b"]
    m = scoring.mc_metrics(lls, choices, gold=0)
    assert (m["acc"], m["acc_norm"]) == (0.0, 1.0)
    assert m["pred"] == 1 and m["pred_norm"] == 0
    tie = scoring.mc_metrics([-1.0, -1.0], ["x", "y"], gold=1)  # numpy argmax: the first index wins ties
    assert tie["acc"] == 0.0
    assert scoring.mc_metrics([-3.0, -1.0], ["x", "y"], gold=[0, 1])["acc"] == 1.0


def test_mc2_is_normalised_true_mass():
    lls = [math.log(0.3), math.log(0.1), math.log(0.6)]
    assert scoring.mc2_metric(lls, [1, 1, 0]) == pytest.approx(0.4)


def test_stderr_is_sample_std_over_sqrt_n():
    assert scoring.mean_stderr([1, 0, 1, 0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert scoring.mean_stderr([1.0]) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("She had 3 + 4 = 7. The answer is 7.", "7"),
    ("Total is 1,000 * 2 = 2,000. The answer is 2,000.", "2000"),
    ("I think it costs $18.00 in the end", "18"),
    ("No number here at all", None),
    ("First 5 then 12 so maybe -3", "-3"),
])
def test_gsm8k_extraction(text, expected):
    assert scoring.extract_gsm8k(text) == expected


def test_gsm8k_check():
    doc = Doc(id="1", answers=["2000"])
    assert scoring.check_number("2,000", doc) and scoring.check_number("2000.0", doc)
    assert not scoring.check_number("200", doc)


@pytest.mark.parametrize("text,expected", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("nested \\boxed{\\sqrt{2}+{1}} end", "\\sqrt{2}+{1}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("Final Answer: The final answer is $9$.", "9"),
    ("nothing boxed", None),
])
def test_math_extraction(text, expected):
    assert scoring.extract_math(text) == expected


@pytest.mark.parametrize("a,b,same", [
    ("\\frac12", "\\frac{1}{2}", True), ("0.5", "\\frac{1}{2}", True), ("1/2", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True), ("x = 5", "5", True), ("90^\\circ", "90", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True), ("10\\%", "10", True), ("3", "4", False),
    ("\\sqrt2", "\\sqrt{2}", True), ("\\frac{1}{3}", "\\frac{1}{2}", False),
])
def test_math_equivalence(a, b, same):
    assert scoring.math_equiv(a, b) is same


def test_bbh_extraction_and_exact_match():
    doc = Doc(id="x", answers=["(B)"])
    pred = scoring.extract_bbh("Tomorrow is 12/25/1937. So the answer is (B).")
    assert pred == "(B)" and scoring.check_exact(pred, doc)
    assert scoring.extract_bbh("I cannot tell.") is None
    assert not scoring.check_exact(scoring.extract_bbh("So the answer is (A)."), doc)


def test_triviaqa_alias_match_ignores_case_and_punctuation():
    doc = Doc(id="t", answers=["Sunset Boulevard", "Sunset Blvd"])
    assert scoring.check_alias(" sunset blvd.", doc)
    assert scoring.check_alias("SUNSET BOULEVARD", doc)
    assert not scoring.check_alias("Cats", doc)


@pytest.mark.parametrize("text,expected", [
    (" B", "B"), (" (C) because", "C"), ("B. Mars", "B"), ("The answer is D.", "D"),
    (" I think the answer is: (A)", "A"), (" Mars", None), (" E", None),
])
def test_letter_extraction(text, expected):
    assert scoring.extract_letter(text, 4) == expected


def test_code_post_processing():
    doc = Doc(id="HumanEval/x", extra={"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(2) == 4\n",
                                       "entry_point": "f"})
    prog = scoring.humaneval_program(doc, "    return x * 2\n\ndef junk():\n    pass\n", ("\ndef", "\nclass"))
    assert "junk" not in prog and prog.rstrip().endswith("check(f)")
    chat = "Here you go:\n```python\ndef f(x):\n    return x + x\n```\nDone."
    assert "return x + x" in scoring.humaneval_program(doc, chat, ())
    assert scoring.fenced_code("no code") is None
