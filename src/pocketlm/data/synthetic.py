"""Procedural synthetic textbook data: lessons and exercises whose answers are verified.

Phi-3 (and phi-1/phi-1.5 before it) trains on synthetic "textbook-like" text that teaches reasoning; Cosmopedia
gets diversity by crossing topics x audiences x styles. These generators do the same procedurally, with no
model in the loop, so every answer can be checked:

- `arithmetic`: a multi-step expression worked step by step; the answer is re-evaluated from the expression
  text by an independent evaluator (`safe_eval`, an AST walker over +, -, *, / and parentheses, exact
  fractions).
- `word_problem`: shopping, speed-distance-time, sharing, area and age problems; the answer is re-computed from
  the problem's formula by `safe_eval`.
- `logic`: (a) propositional formulas classified as tautology / contradiction / contingent with a truth table,
  re-checked by evaluating the formula as Python boolean code on every assignment; (b) ordering puzzles
  ("A is taller than B ..."), re-checked by brute force over all orderings.
- `units`: unit conversion with exact factors, checked by converting back.
- `code`: a small Python function with a worked explanation and assert-based tests; the tests are executed
  (`exec` in a fresh namespace: the code is ours, not a model's) and must pass; expected values come from a
  separate reference implementation.

Diversity: each document draws a topic family, an audience (5) and a style (5) from `random.Random(f"{seed}:
{index}")`, plus names, objects and numbers, so document i is the same for a given seed whatever else is
generated. No two documents alike: a document is rejected and redrawn (up to 20 tries) when its normalised text
hashes equal an earlier one or its MinHash similarity to an earlier one is >= 0.9 (`dedup.Deduplicator`);
`generate` reports how many were redrawn.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import operator
import random
from fractions import Fraction
from typing import Callable

from pocketlm.data.dedup import DedupConfig, Deduplicator
from pocketlm.data.records import DataPipelineError, Document

AUDIENCES = ["young children", "middle school students", "high school students", "college students",
             "adult learners"]
STYLES = ["textbook", "tutorial", "dialogue", "worked example", "story"]
NAMES = ["Ada", "Ben", "Chen", "Dara", "Elif", "Femi", "Gita", "Hugo", "Ines", "Jon", "Kemal", "Lena", "Mona",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tess", "Umar", "Vera", "Wen", "Xavi", "Yara", "Zoe"]
ITEMS = [("apple", "apples"), ("notebook", "notebooks"), ("pencil", "pencils"), ("ticket", "tickets"),
         ("loaf of bread", "loaves of bread"), ("marble", "marbles"), ("stamp", "stamps"), ("orange", "oranges"),
         ("book", "books"), ("candle", "candles"), ("battery", "batteries"), ("plant", "plants")]


class VerificationError(DataPipelineError):
    """A generated document's answer did not check out (a generator bug: never written as data)."""


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expr: str) -> Fraction:
    """Exact value of an arithmetic expression of integers, + - * / and parentheses."""
    def walk(n):
        if isinstance(n, ast.Expression):
            return walk(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return Fraction(n.value)
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](walk(n.left), walk(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -walk(n.operand)
        raise VerificationError(f"unsupported expression {ast.dump(n)[:60]} in {expr!r}")
    return walk(ast.parse(expr, mode="eval"))


def fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _intro(rng: random.Random, topic: str, audience: str, style: str) -> str:
    teacher, student = rng.sample(NAMES, 2)
    if style == "dialogue":
        return f"{student}: Can you show me how {topic} works?\n{teacher}: Of course. Let's work through one together."
    if style == "story":
        return f"{student} was stuck on a question about {topic}, so {teacher} sat down to help."
    if style == "tutorial":
        return f"In this short tutorial for {audience} we practise {topic}, one step at a time."
    if style == "worked example":
        return f"Worked example ({topic}, written for {audience})."
    return f"Lesson: {topic}. This section is written for {audience}."


# ---------------------------------------------------------------- arithmetic
def gen_arithmetic(rng: random.Random) -> tuple[str, dict]:
    a, b, c, d = (rng.randint(2, 60) for _ in range(4))
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    expr = f"({a} {op1} {b}) {op2} {c}"
    third = rng.choice(["-", "*"]) if rng.random() < 0.5 else None
    if third:
        expr = f"{expr} - {d}" if third == "-" else f"({expr}) * {d}"
    # worked solution by explicit steps (independent from safe_eval on the whole string)
    steps, first = [], {"+": a + b, "-": a - b, "*": a * b}[op1]
    steps.append(f"First work out the brackets: {a} {op1} {b} = {first}.")
    second = {"+": first + c, "-": first - c, "*": first * c}[op2]
    steps.append(f"Then {first} {op2} {c} = {second}.")
    value = second
    if third == "-":
        value = second - d
        steps.append(f"Finally subtract {d}: {second} - {d} = {value}.")
    elif third == "*":
        value = second * d
        steps.append(f"Finally multiply by {d}: {second} * {d} = {value}.")
    if safe_eval(expr) != value:
        raise VerificationError(f"arithmetic {expr}: steps give {value}, evaluator {safe_eval(expr)}")
    text = (f"Problem: compute {expr}.\n\nRemember the order of operations: brackets first, then multiplication, "
            f"then addition and subtraction from left to right.\n" + "\n".join(steps) +
            f"\n\nAnswer: {value}.\nCheck: evaluating {expr} directly also gives {value}.")
    return text, {"answer": str(value), "expression": expr}


# ---------------------------------------------------------------- word problems
def gen_word_problem(rng: random.Random) -> tuple[str, dict]:
    name, other = rng.sample(NAMES, 2)
    kind = rng.choice(["shopping", "speed", "sharing", "area", "ages"])
    if kind == "shopping":
        (one, many), n, price, paid = rng.choice(ITEMS), rng.randint(2, 12), rng.randint(1, 9), 0
        paid = (n * price // 10 + 1) * 10
        formula = f"{paid} - {n} * {price}"
        q = (f"{name} buys {n} {many} at {price} dollars each and pays with {paid} dollars. How much change does "
             f"{name} get?")
        sol = (f"The {many} cost {n} x {price} = {n * price} dollars. The change is {paid} - {n * price} = "
               f"{paid - n * price} dollars.")
    elif kind == "speed":
        speed, hours = rng.randint(3, 90), rng.randint(2, 9)
        formula = f"{speed} * {hours}"
        q = f"A train travels at {speed} km per hour for {hours} hours. How far does it go, in km?"
        sol = f"Distance = speed x time = {speed} x {hours} = {speed * hours} km."
    elif kind == "sharing":
        people, each = rng.randint(2, 9), rng.randint(2, 15)
        total = people * each
        one, many = rng.choice(ITEMS)
        formula = f"{total} / {people}"
        q = f"{name} shares {total} {many} equally among {people} friends. How many does each friend get?"
        sol = f"Each friend gets {total} / {people} = {each} {many}, because {people} x {each} = {total}."
    elif kind == "area":
        w, h = rng.randint(2, 40), rng.randint(2, 40)
        formula = f"{w} * {h}"
        q = f"{name}'s garden is a rectangle {w} m wide and {h} m long. What is its area in square metres?"
        sol = f"The area of a rectangle is width x length = {w} x {h} = {w * h} square metres."
    else:
        age, diff, years = rng.randint(5, 40), rng.randint(1, 30), rng.randint(1, 20)
        formula = f"{age} + {diff} + {years}"
        q = (f"{name} is {age} years old. {other} is {diff} years older than {name}. How old will {other} be in "
             f"{years} years?")
        sol = (f"{other} is {age} + {diff} = {age + diff} now, so in {years} years {other} will be "
               f"{age + diff} + {years} = {age + diff + years}.")
    answer = safe_eval(formula)
    if fmt(answer) not in sol:
        raise VerificationError(f"word problem {kind}: solution {sol!r} does not state {fmt(answer)}")
    text = f"Exercise: {q}\n\nSolution: {sol}\n\nAnswer: {fmt(answer)}."
    return text, {"answer": fmt(answer), "formula": formula, "problem": kind}


# ---------------------------------------------------------------- logic
def _formula(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.25:
        v = rng.choice("pqr")
        return v if rng.random() < 0.7 else f"not {v}"
    op = rng.choice(["and", "or", "implies"])
    a, b = _formula(rng, depth - 1), _formula(rng, depth - 1)
    return f"({a} {op} {b})"


def _py(formula: str) -> str:
    """The formula as Python boolean code, for the independent check: 'not v' -> '(not v)', implies -> '<='
    (for booleans a <= b is material implication; every binary operation is parenthesised)."""
    out, toks, i = [], formula.replace("(", " ( ").replace(")", " ) ").split(), 0
    while i < len(toks):
        if toks[i] == "not":
            out.append(f"(not {toks[i + 1]})")
            i += 2
            continue
        out.append("<=" if toks[i] == "implies" else toks[i])
        i += 1
    return " ".join(out)


def _truth(formula: str, env: dict) -> bool:
    if formula.startswith("(") and formula.endswith(")"):
        depth = 0
        for i, ch in enumerate(formula):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(formula) - 1:
                break
        else:
            inner = formula[1:-1]  # split at the top-level operator
            i, depth = 0, 0
            while i < len(inner):
                ch = inner[i]
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    for op in (" implies ", " and ", " or "):
                        if inner.startswith(op, i):
                            a, b = _truth(inner[:i], env), _truth(inner[i + len(op):], env)
                            return {" implies ": (not a) or b, " and ": a and b, " or ": a or b}[op]
                i += 1
            return _truth(inner, env)
    if formula.startswith("not "):
        return not _truth(formula[4:], env)
    return env[formula]


def gen_logic(rng: random.Random) -> tuple[str, dict]:
    if rng.random() < 0.5:
        f = _formula(rng, rng.randint(2, 3))
        vs = sorted({c for c in f.replace("not", "").replace("implies", "").replace("and", "").replace("or", "")
                     if c in "pqr"})
        rows, values = [], []
        for combo in itertools.product([True, False], repeat=len(vs)):
            env = dict(zip(vs, combo))
            v = _truth(f, env)
            values.append(v)
            rows.append(" | ".join("T" if env[x] else "F" for x in vs) + f" | {'T' if v else 'F'}")
        verdict = "a tautology" if all(values) else "a contradiction" if not any(values) else "contingent"
        for combo, v in zip(itertools.product([True, False], repeat=len(vs)), values):  # independent check
            if eval(_py(f), {"__builtins__": {}}, dict(zip(vs, combo))) != v:  # noqa: S307 - our own formula
                raise VerificationError(f"logic {f}: truth table disagrees with Python at {combo}")
        text = (f"Exercise: is the formula {f} a tautology, a contradiction, or contingent?\n\n"
                f"'A implies B' is false only when A is true and B is false. We check every assignment:\n\n"
                + " | ".join(vs) + " | value\n" + "\n".join(rows) +
                f"\n\nThe formula is true in {sum(values)} of {len(values)} rows, so it is {verdict}.\n"
                f"Answer: {verdict}.")
        return text, {"answer": verdict, "formula": f, "problem": "propositional"}
    people = rng.sample(NAMES, rng.randint(3, 5))
    order = people[:]  # tallest first
    facts = [f"{order[i]} is taller than {order[i + 1]}." for i in range(len(order) - 1)]
    rng.shuffle(facts)
    solutions = [p for p in itertools.permutations(people)
                 if all(p.index(f.split(" is taller than ")[0]) < p.index(f.split(" is taller than ")[1][:-1])
                        for f in facts)]
    if len(solutions) != 1 or list(solutions[0]) != order:
        raise VerificationError(f"ordering puzzle {facts}: {len(solutions)} solutions")
    text = ("Puzzle: " + " ".join(facts) + " Who is the tallest, and who is the shortest?\n\n"
            "Reasoning: chain the facts together. Each fact links two people, and following the links from the "
            f"person nobody is taller than gives the full order: {' > '.join(order)}.\n"
            f"Answer: {order[0]} is the tallest and {order[-1]} is the shortest.")
    return text, {"answer": f"{order[0]};{order[-1]}", "problem": "ordering"}


# ---------------------------------------------------------------- units
UNITS = {
    "length": {"millimetre": Fraction(1, 1000), "centimetre": Fraction(1, 100), "metre": Fraction(1),
               "kilometre": Fraction(1000), "inch": Fraction(254, 10000), "foot": Fraction(3048, 10000)},
    "mass": {"gram": Fraction(1, 1000), "kilogram": Fraction(1), "tonne": Fraction(1000),
             "pound": Fraction(45359237, 100000000)},
    "time": {"second": Fraction(1), "minute": Fraction(60), "hour": Fraction(3600), "day": Fraction(86400)},
    "volume": {"millilitre": Fraction(1, 1000), "litre": Fraction(1), "cubic metre": Fraction(1000)},
}


def gen_units(rng: random.Random) -> tuple[str, dict]:
    quantity = rng.choice(sorted(UNITS))
    src, dst = rng.sample(sorted(UNITS[quantity]), 2)
    amount = Fraction(rng.randint(1, 500))
    factor = UNITS[quantity][src] / UNITS[quantity][dst]
    result = amount * factor
    if result * UNITS[quantity][dst] / UNITS[quantity][src] != amount:
        raise VerificationError(f"units {amount} {src}->{dst}: round trip failed")
    approx = f" (about {float(result):.4g})" if result.denominator != 1 else ""
    text = (f"Exercise: convert {fmt(amount)} {src}s to {dst}s.\n\nOne {src} is {fmt(factor)} {dst}s, because "
            f"one {src} is {fmt(UNITS[quantity][src])} and one {dst} is {fmt(UNITS[quantity][dst])} of the base "
            f"unit of {quantity}. Multiply: {fmt(amount)} x {fmt(factor)} = {fmt(result)}{approx}.\n"
            f"Check: converting {fmt(result)} {dst}s back gives {fmt(amount)} {src}s.\n"
            f"Answer: {fmt(result)} {dst}s.")
    return text, {"answer": fmt(result), "problem": f"{quantity}:{src}->{dst}"}


# ---------------------------------------------------------------- code
def gen_code(rng: random.Random) -> tuple[str, dict]:
    task = rng.choice(["sum_multiples", "count_char", "fizz", "running_max", "gcd", "reverse_words"])
    if task == "sum_multiples":
        k, n = rng.randint(2, 9), rng.randint(10, 200)
        desc = f"returns the sum of all multiples of {k} below n"
        code = f"def solve(n):\n    total = 0\n    for i in range(n):\n        if i % {k} == 0:\n            total += i\n    return total\n"
        ref = lambda x: sum(range(0, x, k))  # noqa: E731
        cases = [n, rng.randint(1, 50), 0]
    elif task == "count_char":
        ch = rng.choice("aeiou")
        desc = f"returns how many times the letter '{ch}' occurs in the string s"
        code = f"def solve(s):\n    count = 0\n    for c in s:\n        if c == '{ch}':\n            count += 1\n    return count\n"
        ref = lambda s: s.count(ch)  # noqa: E731
        cases = ["".join(rng.choice("abcdeiou xyz") for _ in range(rng.randint(0, 30))) for _ in range(3)]
    elif task == "fizz":
        a, b = rng.sample([2, 3, 4, 5, 6, 7], 2)
        w1, w2 = rng.sample(["Fizz", "Buzz", "Bing", "Bong", "Zap"], 2)
        desc = f"returns '{w1}{w2}' if n is divisible by both {a} and {b}, '{w1}' if only by {a}, '{w2}' if only by {b}, else str(n)"
        code = (f"def solve(n):\n    if n % {a} == 0 and n % {b} == 0:\n        return '{w1}{w2}'\n"
                f"    if n % {a} == 0:\n        return '{w1}'\n    if n % {b} == 0:\n        return '{w2}'\n"
                f"    return str(n)\n")
        ref = lambda n: (w1 if n % a == 0 else "") + (w2 if n % b == 0 else "") or str(n)  # noqa: E731
        cases = [a * b, a, b, 1, rng.randint(1, 100)]
    elif task == "running_max":
        desc = "returns a list whose i-th element is the largest of xs[0..i]"
        code = ("def solve(xs):\n    out = []\n    best = None\n    for x in xs:\n        if best is None or x > best:\n"
                "            best = x\n        out.append(best)\n    return out\n")
        ref = lambda xs: [max(xs[:i + 1]) for i in range(len(xs))]  # noqa: E731
        cases = [[rng.randint(-20, 20) for _ in range(rng.randint(0, 8))] for _ in range(3)]
    elif task == "gcd":
        desc = "returns the greatest common divisor of a and b using Euclid's algorithm"
        code = "def solve(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n"
        import math
        ref = math.gcd
        cases = [(rng.randint(1, 500), rng.randint(1, 500)) for _ in range(3)]
    else:
        sep = rng.choice([" ", ", "])
        desc = f"returns the words of s in reverse order, joined by {sep!r}"
        code = f"def solve(s):\n    return {sep!r}.join(reversed(s.split()))\n"
        ref = lambda s: sep.join(s.split()[::-1])  # noqa: E731
        cases = [" ".join(rng.sample(NAMES, rng.randint(1, 5))) for _ in range(3)]
    tests = "\n".join(f"assert solve{c!r} == {ref(*c)!r}" if isinstance(c, tuple)
                      else f"assert solve({c!r}) == {ref(c)!r}" for c in cases)
    ns: dict = {}
    try:
        exec(compile(code + "\n" + tests + "\n", "<synthetic>", "exec"), ns)  # noqa: S102 - generated by us
    except AssertionError:
        raise VerificationError(f"code task {task}: tests fail for\n{code}\n{tests}") from None
    cost = ("Each loop step replaces (a, b) by (b, a mod b), and the remainder at least halves every two steps, so "
            "the number of steps grows only logarithmically." if task == "gcd" else
            "The function looks at each element of the input once, so its running time grows linearly with the "
            "size of the input.")
    text = (f"Exercise: write a Python function solve that {desc}.\n\nSolution:\n\n```python\n{code}```\n\n"
            f"{cost}\n\nTests:\n\n```python\n{tests}\n```\n")
    return text, {"answer": code, "tests": tests, "problem": task}


GENERATORS: dict[str, tuple[str, Callable[[random.Random], tuple[str, dict]]]] = {
    "arithmetic": ("arithmetic with brackets", gen_arithmetic),
    "word_problem": ("word problems", gen_word_problem),
    "logic": ("logical reasoning", gen_logic),
    "units": ("unit conversion", gen_units),
    "code": ("programming in Python", gen_code),
}


def make_document(seed: int, index: int, kinds: list[str] | None = None, attempt: int = 0) -> Document:
    rng = random.Random(f"{seed}:{index}:{attempt}")
    kinds = kinds or sorted(GENERATORS)
    kind = rng.choice(kinds)
    if kind not in GENERATORS:
        raise DataPipelineError(f"unknown synthetic generator {kind!r}; known: {sorted(GENERATORS)}")
    topic, fn = GENERATORS[kind]
    audience, style = rng.choice(AUDIENCES), rng.choice(STYLES)
    body, info = fn(rng)
    text = _intro(rng, topic, audience, style) + "\n\n" + body
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    meta = {"source": "synthetic", "generator": kind, "topic": topic, "audience": audience, "style": style,
            "verified": True, "seed": seed, "index": index, **{k: v for k, v in info.items() if k != "tests"}}
    return Document(f"synthetic/{kind}/{index:08d}-{digest}", text, meta)


def generate(n: int, seed: int = 0, kinds: list[str] | None = None, *, near_threshold: float = 0.9,
             max_tries: int = 20) -> tuple[list[Document], dict]:
    """n verified, mutually distinct documents, and stats {"redrawn": k, "by_generator": {...}}."""
    dd = Deduplicator(DedupConfig(threshold=near_threshold))  # the signature seed the pipeline's dedup uses
    docs, redrawn, by_gen = [], 0, {}
    for i in range(n):
        for attempt in range(max_tries):
            doc = make_document(seed, i, kinds, attempt)
            if dd.check(doc.id, doc.text) is None:
                break
            redrawn += 1
        else:
            raise DataPipelineError(f"synthetic document {i}: no distinct document in {max_tries} tries; "
                                    f"ask for fewer documents or more generators")
        docs.append(doc)
        by_gen[doc.metadata["generator"]] = by_gen.get(doc.metadata["generator"], 0) + 1
    return docs, {"redrawn": redrawn, "by_generator": dict(sorted(by_gen.items())), **dd.stats}
