"""Long-context retrieval tasks (pocketlm.eval.longctx): seeded generation that fits the token budget, needles at
their depths, exact scoring shown by a fake backend that answers right or wrong on purpose, and the CLI."""

from __future__ import annotations

import json
import re

import pytest

from pocketlm.eval import longctx
from pocketlm.eval.longctx import LongContextError, make_items, score


def words(text: str) -> int:  # a stand-in tokenizer: one token per whitespace-separated word
    return len(text.split())


class FakeBackend:
    """Answers from the generated items themselves (it rebuilds them: generation is deterministic), right when
    `policy(item)` says so, else with a near miss: the value with a digit appended / a wrong variable."""

    def __init__(self, tasks, lengths, depths, samples, policy, seed=0):
        self.items = {it.prompt: it for t in tasks for it in make_items(t, lengths, depths, samples, words, seed)}
        self.policy = policy
        self.calls = 0

    _encode = staticmethod(str.split)

    def generate(self, prompts, *, stop=(), max_tokens=16, **_):
        out = []
        for p in prompts:
            self.calls += 1
            it = self.items[p]
            right = self.policy(it)
            if it.task == "vartrack":
                k = len(it.expected) if right is True else int(right)  # right may be a count of names
                out.append(" " + ", ".join(it.expected[:k] + it.extra["decoy"][:2]))
            else:
                out.append(f" {it.expected[0]}." if right else f" {it.expected[0]}7 or {it.expected[0][1:]}")
        return out


LENGTHS, DEPTHS = [200, 400], [0, 50, 100]


@pytest.mark.parametrize("policy, want", [
    (lambda it: True, 1.0),
    (lambda it: False, 0.0),
    (lambda it: it.depth <= 50, 2 / 3),  # right at depths 0 and 50 of (0, 50, 100)
    (lambda it: it.length == 200 and it.index == 0, 1 / 4),  # one length of two, one sample of two
])
def test_scores_follow_the_answers_exactly(policy, want):
    fake = FakeBackend(longctx.TASKS, LENGTHS, DEPTHS, 2, policy)
    res = longctx.run(fake, longctx.TASKS, LENGTHS, DEPTHS, samples=2)
    assert fake.calls == len(longctx.TASKS) * 2 * 3 * 2
    for name, r in res["tasks"].items():
        assert r["score"] == pytest.approx(want), name
        assert r["items"] == 12


def test_vartrack_counts_each_variable_and_by_cell_grid():
    fake = FakeBackend(["vartrack"], [300], [0, 100], 1, lambda it: 3 if it.depth == 0 else True)
    res = longctx.run(fake, ["vartrack"], [300], [0, 100], samples=1)
    grid = res["tasks"]["vartrack"]["grid"]["300"]
    assert grid == {"0": pytest.approx(3 / 5), "100": 1.0}
    assert res["tasks"]["vartrack"]["score"] == pytest.approx(0.8)


def test_score_is_whole_word_match():
    assert score("The pass key is 12345.", ["12345"]) == 1.0
    assert score("123456", ["12345"]) == 0.0 and score("012345", ["12345"]) == 0.0
    assert score("AAAAA, CCCCC", ["AAAAA", "BBBBB", "CCCCC", "DDDDD"]) == 0.5


def test_items_fit_their_length_and_put_the_needle_at_its_depth():
    for task in longctx.TASKS:
        items = make_items(task, [256, 1024], [0, 50, 100], 2, words, seed=3)
        again = make_items(task, [256, 1024], [0, 50, 100], 2, words, seed=3)
        assert [i.prompt for i in items] == [i.prompt for i in again]  # seeded: the same items every time
        assert len({i.prompt for i in items}) == len(items)  # and distinct ones
        for it in items:
            budget = it.length - it.max_tokens
            assert it.prompt_tokens == words(it.prompt) <= budget
            assert it.prompt_tokens > budget - 40  # filled up to within one filler sentence (+ a needle)
            assert all(v in it.prompt for v in it.expected)
    # where the needle sits in the haystack: the fraction of the haystack's characters before it follows the depth
    for depth in (0, 25, 50, 75, 100):
        it = make_items("passkey", [2048], [depth], 1, words)[0]
        hay = it.prompt.split("\n")[1]
        at = hay.index("The pass key is") / len(hay)
        assert abs(at - depth / 100) < 0.03, (depth, at)
    # vartrack: the chain's statements appear in order, the first holding the value
    it = make_items("vartrack", [1024], [25], 1, words)[0]
    names = it.expected
    pos = [it.prompt.index(f"VAR {names[0]} = {it.extra['value']}.")]
    pos += [it.prompt.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
    assert pos == sorted(pos)


def test_options_are_checked():
    assert longctx.parse_lengths(16384, None, None) == [2048, 4096, 8192, 16384]
    assert longctx.parse_lengths(None, "512,256", 1024) == [256, 512]
    with pytest.raises(LongContextError, match="exceeds the model's context"):
        longctx.parse_lengths(8192, None, 4096)
    with pytest.raises(LongContextError, match="--max-length"):
        longctx.parse_lengths(None, None, None)
    with pytest.raises(LongContextError, match="below"):
        longctx.parse_lengths(None, "64", None)
    with pytest.raises(LongContextError, match="percentages"):
        longctx.parse_depths("0,150")
    with pytest.raises(LongContextError, match="cannot even hold"):
        make_items("niah", [130], [0], 1, lambda t: 10 ** 6)


def test_cli_eval_niah_passkey_on_a_tiny_model(tmp_path, capsys):
    from pocketlm.cli import main
    out = tmp_path / "out"
    rc = main(["eval", "tiny", "--tasks", "niah,passkey", "--max-length", "160", "--depths", "0,100",
               "--samples", "1", "--out", str(out), "--no-progress", "--kv-cache", "q8_0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert re.search(r"niah\s+\d+\.\d%", text) and "passkey" in text
    res = json.loads((out / "longctx_results.json").read_text())
    assert res["lengths"] == [160] and res["token_count"] == "the model's tokenizer"
    rows = [json.loads(line) for line in (out / "samples_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(140 < r["prompt_tokens"] <= 160 - 12 for r in rows)
    assert (out / "longctx_heatmap.png").stat().st_size > 1000
