"""Long-context retrieval tasks in the style of RULER (Hsieh et al. 2024), generated offline from a seed.

    pocketlm eval MODEL --tasks niah,passkey,multikey,vartrack --max-length 16384 [--lengths 4096,16384]
                        [--depths 0,25,50,75,100] [--limit N] [--out DIR]

Every item is built here, deterministically from (task, seed, length, depth, index): no data files, no
network. A prompt is filled with haystack text up to the target length in the evaluated model's own tokens
(binary search on the number of filler sentences; the prompt plus the answer budget fits the length), the
needle(s) are inserted at the sentence boundary nearest the depth (0% = the start of the haystack, 100% = its
end), and the model completes the prompt greedily.

Tasks (each a grid of lengths x depths, `samples` items per cell):
- niah: one needle "One of the special magic numbers for {key} is: {7 digits}." in seeded prose built from word
  lists (RULER niah_single with a generated essay instead of Paul Graham's); the question names the key.
- passkey: "The pass key is {5 digits}. Remember it. {5 digits} is the pass key." in the repeated "The grass is
  green. The sky is blue. ..." noise (Mohtashami & Jaggi 2023, RULER's passkey).
- multikey: four needles with different keys (three distractors, RULER niah_multikey_1); the asked one sits at the
  depth, the distractors at seeded depths.
- vartrack: RULER's variable tracking: a chain "VAR A = 12345", "VAR B = VAR A", ... (5 variables, one hop each)
  plus a distractor chain with another value, spread through the noise starting at the depth; the answer is
  every variable of the first chain.

Scoring is exact and documented: an expected value counts as found when it appears in the completion as a whole
word (regex `\\b{value}\\b`, so 1234 does not match 12345). niah, passkey, multikey: 1 if found else 0.
vartrack: the fraction of the chain's variables found (RULER's string_match_all). A task's score is the mean
over all items; the report also gives each (length, depth) cell. The PNG heatmap (--out) shows each depth-grid
task's accuracy by length and depth.

Token counting: a pocketlm model's own tokenizer (PocketLMBackend); for an OpenAI-compatible endpoint, whose
tokenizer is not known here, 4 characters per token (stated in the results as `token_count`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from pocketlm.errors import PocketLMError

TASKS = ("niah", "passkey", "multikey", "vartrack")
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_SAMPLES = 4
MIN_LENGTH = 128


class LongContextError(PocketLMError, ValueError):
    """A long-context task, length or depth setting is invalid."""


@dataclass
class Item:
    """One generated prompt and what a right answer must contain."""
    task: str
    length: int              # target prompt length in tokens (prompt + answer budget <= length)
    depth: int | None        # percent; None for tasks without a depth axis
    index: int
    prompt: str
    expected: list[str]      # values the completion must contain
    prompt_tokens: int = 0
    max_tokens: int = 16
    extra: dict = field(default_factory=dict)


# ---- haystacks ------------------------------------------------------------------------------------------------

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_ADJ = ("quiet", "old", "bright", "narrow", "distant", "small", "heavy", "warm", "early", "simple", "curious", "green")
_NOUN = ("river", "village", "teacher", "machine", "garden", "letter", "window", "engineer", "market", "bridge",
         "library", "farmer", "station", "painter", "harbor", "forest")
_VERB = ("crossed", "repaired", "watched", "described", "visited", "carried", "measured", "painted", "opened",
         "followed", "built", "studied")
_ADV = ("slowly", "every morning", "without a word", "before the rain", "in the evening", "with great care",
        "for many years", "after the storm")
_WORDS = ("apple", "violet", "copper", "falcon", "meadow", "harbor", "lantern", "pepper", "marble", "saddle",
          "ember", "thistle", "cobalt", "orchid", "walnut", "glacier", "raven", "tundra", "saffron", "quartz")


def _essay_sentence(r: random.Random) -> str:
    return (f"The {r.choice(_ADJ)} {r.choice(_NOUN)} {r.choice(_VERB)} the {r.choice(_ADJ)} {r.choice(_NOUN)} "
            f"{r.choice(_ADV)}.")


def _key(r: random.Random) -> str:
    return f"{r.choice(_WORDS)}-{r.choice(_WORDS)}"


def _digits(r: random.Random, n: int) -> str:
    return str(r.randrange(10 ** (n - 1), 10 ** n))


def _var(r: random.Random, taken: set[str]) -> str:
    while True:
        v = "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


def _insert(sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Put each needle at the sentence boundary nearest its depth fraction (0 = first, 1 = after the last)."""
    out = list(sentences)
    # deepest first, so earlier indices stay valid; at one index the later needle first, so they keep their order
    for _, (frac, text) in sorted(enumerate(needles), key=lambda t: (-t[1][0], -t[0])):
        out.insert(round(frac * len(sentences)), text)
    return " ".join(out)


# ---- the builders: (rng, n filler sentences, depth fraction) -> (prompt, expected, extra) -----------------------

def _niah(r: random.Random, depth: float):
    key, value = _key(r), _digits(r, 7)
    needle = f"One of the special magic numbers for {key} is: {value}."
    filler_seed = r.random()

    def build(n: int) -> str:
        fr = random.Random(filler_seed)
        hay = _insert([_essay_sentence(fr) for _ in range(n)], [(depth, needle)])
        return ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                f"I will quiz you about the numbers afterwards.\n{hay}\nWhat is the special magic number for {key} "
                f"mentioned in the provided text? The special magic number for {key} mentioned in the provided "
                "text is")
    return build, [value], {"key": key}


def _passkey(r: random.Random, depth: float):
    value = _digits(r, 5)
    needle = f"The pass key is {value}. Remember it. {value} is the pass key."

    def build(n: int) -> str:
        hay = _insert([NOISE] * n, [(depth, needle)])
        return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
                f"quiz you about the important information there.\n{hay}\nWhat is the pass key? The pass key is")
    return build, [value], {}


def _multikey(r: random.Random, depth: float):
    keys: list[str] = []
    while len(keys) < 4:
        k = _key(r)
        if k not in keys:
            keys.append(k)
    values = [_digits(r, 7) for _ in keys]
    fracs = [depth] + [r.random() for _ in keys[1:]]
    needles = [(f, f"One of the special magic numbers for {k} is: {v}.") for f, k, v in zip(fracs, keys, values)]
    filler_seed = r.random()

    def build(n: int) -> str:
        fr = random.Random(filler_seed)
        hay = _insert([_essay_sentence(fr) for _ in range(n)], needles)
        return ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                f"I will quiz you about the numbers afterwards.\n{hay}\nWhat is the special magic number for "
                f"{keys[0]} mentioned in the provided text? The special magic number for {keys[0]} mentioned in "
                "the provided text is")
    return build, [values[0]], {"key": keys[0], "distractors": dict(zip(keys[1:], values[1:]))}


def _vartrack(r: random.Random, depth: float):
    taken: set[str] = set()
    value, other = _digits(r, 5), _digits(r, 5)
    chain = [_var(r, taken) for _ in range(5)]
    decoy = [_var(r, taken) for _ in range(5)]

    def statements(names, val):
        return [f"VAR {names[0]} = {val}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    # the chain in order from the depth to the end of the haystack, the decoy chain spread over all of it
    span = 1.0 - depth
    needles = [(depth + span * i / 5, s) for i, s in enumerate(statements(chain, value))]
    needles += [(r.random(), s) for s in statements(decoy, other)]

    def build(n: int) -> str:
        hay = _insert([NOISE] * n, needles)
        return ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                f"{hay}\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {len(chain)} "
                "variables are assigned the value "
                f"{value}, they are:")
    return build, chain, {"value": value, "decoy": decoy}


BUILDERS = {"niah": (_niah, 16), "passkey": (_passkey, 12), "multikey": (_multikey, 16), "vartrack": (_vartrack, 32)}


def _fit(build: Callable[[int], str], count: Callable[[str], int], budget: int) -> tuple[str, int]:
    """The prompt with the most filler sentences whose token count is <= budget (binary search)."""
    lo, hi = 0, 1
    while count(build(hi)) <= budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 22:
            raise LongContextError(f"cannot fill {budget} tokens: the token counter does not grow with the text")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(build(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    text = build(lo)
    n = count(text)
    if n > budget:
        raise LongContextError(f"{budget} tokens (the length less the answer budget) cannot even hold the bare "
                               f"question ({n} tokens): use a longer length")
    return text, n


def make_items(task: str, lengths: Sequence[int], depths: Sequence[int], samples: int, count: Callable[[str], int],
               seed: int = 0) -> list[Item]:
    """Every item of `task` over the length x depth grid (deterministic in all arguments)."""
    if task not in BUILDERS:
        raise LongContextError(f"unknown long-context task {task!r}; known: {', '.join(TASKS)}")
    builder, max_tokens = BUILDERS[task]
    items = []
    for length in lengths:
        for depth in depths:
            for i in range(samples):
                r = random.Random(f"{task}/{seed}/{length}/{depth}/{i}")
                build, expected, extra = builder(r, depth / 100)
                prompt, n = _fit(build, count, length - max_tokens)
                items.append(Item(task, length, depth, i, prompt, expected, n, max_tokens, extra))
    return items


def score(completion: str, expected: Sequence[str]) -> float:
    """The fraction of expected values present in the completion as whole words (1.0 / 0.0 for one value)."""
    found = sum(1 for v in expected if re.search(rf"\b{re.escape(v)}\b", completion))
    return found / len(expected)


# ---- options ----------------------------------------------------------------------------------------------------

def parse_lengths(max_length: int | None, lengths: str | None, model_context: int | None) -> list[int]:
    """--lengths "a,b" or, from --max-length M: M, M/2, M/4, M/8 (those >= MIN_LENGTH), ascending."""
    if lengths:
        try:
            out = sorted({int(x) for x in lengths.split(",") if x.strip()})
        except ValueError:
            raise LongContextError(f"--lengths {lengths!r}: expected comma-separated integers") from None
    elif max_length is not None:
        out = sorted({max_length >> k for k in range(4) if max_length >> k >= MIN_LENGTH} or {max_length})
    else:
        raise LongContextError("long-context tasks need --max-length N (or --lengths a,b,...)")
    for n in out:
        if n < MIN_LENGTH:
            raise LongContextError(f"length {n} is below the smallest supported length {MIN_LENGTH}")
        if model_context is not None and n > model_context:
            raise LongContextError(f"length {n} exceeds the model's context of {model_context} tokens")
    return out


def parse_depths(depths: str | None) -> list[int]:
    if not depths:
        return list(DEFAULT_DEPTHS)
    try:
        out = sorted({int(x) for x in depths.split(",") if x.strip()})
    except ValueError:
        raise LongContextError(f"--depths {depths!r}: expected comma-separated percentages") from None
    if not out or out[0] < 0 or out[-1] > 100:
        raise LongContextError(f"--depths {depths!r}: percentages must be in [0, 100]")
    return out


def token_counter(backend) -> tuple[Callable[[str], int], str]:
    enc = getattr(backend, "_encode", None)
    if enc is not None:
        return (lambda text: len(enc(text))), "the model's tokenizer"
    return (lambda text: (len(text) + 3) // 4), "4 characters per token (the endpoint's tokenizer is not known)"


# ---- running ----------------------------------------------------------------------------------------------------

def run(backend, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[int], *, samples: int = DEFAULT_SAMPLES,
        seed: int = 0, out: Path | None = None, progress: bool = False) -> dict:
    """Generate, answer and score every item; write results/samples/heatmap under `out` as each task finishes."""
    count, how = token_counter(backend)
    results = {"lengths": list(lengths), "depths": list(depths), "samples_per_cell": samples, "seed": seed,
               "token_count": how, "tasks": {}}
    for task in tasks:
        items = make_items(task, lengths, depths, samples, count, seed)
        rows = []
        for n, it in enumerate(items):
            completion = backend.generate([it.prompt], stop=["\n"], max_tokens=it.max_tokens)[0]
            rows.append({"length": it.length, "depth": it.depth, "index": it.index, "prompt_tokens": it.prompt_tokens,
                         "expected": it.expected, "completion": completion, "score": score(completion, it.expected)})
            if progress:
                print(f"\r{task}: {n + 1}/{len(items)}", end="", flush=True)
        if progress:
            print()
        grid: dict[str, dict[str, float]] = {}
        for L in lengths:
            grid[str(L)] = {}
            for d in depths:
                cell = [r["score"] for r in rows if r["length"] == L and r["depth"] == d]
                grid[str(L)][str(d)] = sum(cell) / len(cell)
        by_length = {str(L): sum(r["score"] for r in rows if r["length"] == L) / (len(depths) * samples)
                     for L in lengths}
        results["tasks"][task] = {"score": sum(r["score"] for r in rows) / len(rows), "items": len(rows),
                                  "by_length": by_length, "grid": grid}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            (out / "longctx_results.json").write_text(json.dumps(results, indent=2) + "\n")
    if out is not None:
        heatmap(results, out / "longctx_heatmap.png")
    return results


def table(results: dict) -> str:
    lengths = results["lengths"]
    lines = [f"{'task':<10} {'score':>7}  " + "  ".join(f"{L:>7d}" for L in lengths)]
    for name, r in results["tasks"].items():
        lines.append(f"{name:<10} {100 * r['score']:6.1f}%  " +
                     "  ".join(f"{100 * r['by_length'][str(L)]:6.1f}%" for L in lengths))
    return "\n".join(lines)


def heatmap(results: dict, path: Path) -> Path | None:
    """One panel per task: accuracy by depth (rows) and length (columns), as the needle-in-a-haystack plots."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(results["tasks"])
    lengths, depths = results["lengths"], results["depths"]
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 0.9 * len(lengths) * len(names) + 1.5 * len(names), 3.6),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = results["tasks"][name]["grid"]
        z = [[grid[str(L)][str(d)] for L in lengths] for d in depths]
        im = ax.imshow(z, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: {100 * results['tasks'][name]['score']:.0f}%")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{z[i][j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["TASKS", "Item", "LongContextError", "make_items", "parse_depths", "parse_lengths", "run", "score",
           "table", "heatmap"]
