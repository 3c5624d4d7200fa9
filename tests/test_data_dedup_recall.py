"""Near-duplicate recall and precision of the MinHash dedup over document pairs of known 5-gram Jaccard similarity.

Pairs are built by controlled edits: a base document of distinct random words, and a copy with k words replaced by
new ones at positions at least 5 apart, so each edit changes exactly 5 of the copy's 5-gram shingles; the true
Jaccard is then computed from the shingle sets (the same normalisation the deduplicator uses), not assumed.
"""

from __future__ import annotations

import random

from pocketlm.data.dedup import DedupConfig, Deduplicator, candidate_probability, lsh_params, shingles


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(4))


def _pair(rng: random.Random, n_words: int, edits: int) -> tuple[str, str, float]:
    base = [_word(rng) for _ in range(n_words)]
    copy = list(base)
    slots = rng.sample(range(n_words // 5), edits)          # one edit per window of 5 words
    for s in slots:
        copy[s * 5 + rng.randrange(5)] = _word(rng)
    a, b = set(shingles(" ".join(base), 5)), set(shingles(" ".join(copy), 5))
    return " ".join(base), " ".join(copy), len(a & b) / len(a | b)


def _pairs(seed: int, lo: float, hi: float, count: int) -> list[tuple[str, str, float]]:
    """`count` pairs whose true Jaccard lies in [lo, hi]."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        n = rng.randrange(150, 400)
        # J = (S - 5k) / (S + 5k) with S = n - 4 shingles: pick k for a target J in [lo, hi]
        target = rng.uniform(lo, hi)
        k = max(1, round((n - 4) * (1 - target) / (5 * (1 + target))))
        if k > n // 5:
            continue
        a, b, j = _pair(rng, n, k)
        if lo <= j <= hi:
            out.append((a, b, j))
    return out


def _caught(pairs, cfg: DedupConfig) -> list[bool]:
    """For each pair, whether the copy is dropped as a near duplicate of its own base (one stream, all pairs)."""
    dd = Deduplicator(cfg)
    res = []
    for i, (a, b, _) in enumerate(pairs):
        assert dd.check(f"base-{i}", a) is None
        reason = dd.check(f"copy-{i}", b)
        res.append(reason is not None and reason.startswith(f"dedup:near_dup_of:base-{i}:"))
    return res


def test_lsh_split_is_chosen_for_recall_at_the_threshold():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128
    assert candidate_probability(0.8, b, r) >= 0.99
    assert candidate_probability(0.8, 9, 13) < 0.5           # datasketch's equal-weight split: half are missed
    assert DedupConfig().as_dict()["bands"] == b and DedupConfig().as_dict()["rows"] == r


def test_near_duplicate_recall_at_085_to_090():
    pairs = _pairs(1, 0.85, 0.90, 200)
    caught = _caught(pairs, DedupConfig(threshold=0.8))
    recall = sum(caught) / len(caught)
    assert recall >= 0.9, f"recall {recall:.3f} at true Jaccard 0.85-0.90"


def test_dissimilar_pairs_are_not_merged():
    pairs = _pairs(2, 0.30, 0.60, 100)
    caught = _caught(pairs, DedupConfig(threshold=0.8))
    assert sum(caught) == 0
    # and unrelated documents (Jaccard ~0) never cluster with anything
    dd = Deduplicator(DedupConfig())
    assert all(dd.check(f"u{i}", a) is None for i, (a, _, _) in enumerate(_pairs(3, 0.85, 0.9, 60)))
