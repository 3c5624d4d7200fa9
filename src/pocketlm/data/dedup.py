"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash with LSH, `datasketch`).

Exact: sha1 of the text lower-cased with whitespace collapsed. Near: MinHash signatures (128 permutations,
seeded) over word 5-gram shingles of the same normalised text, an LSH index (`datasketch.MinHashLSH`), and every
LSH candidate confirmed by the signatures' estimated Jaccard similarity >= `threshold` (default 0.8; FineWeb used
0.75 with 5-grams and 112 permutations; datatrove's defaults are 5-grams and 14 bands x 8 rows). The first
document in the stream order wins, so the result is deterministic for a given input order (the pipeline orders
documents by source, part and position).

Bands and rows (`lsh_params`): the LSH index only proposes candidates, the signature comparison decides, so the
banding is chosen for recall: of the splits under which a pair at exactly `threshold` becomes a candidate with
probability >= 1 - `max_miss` (default 1%), the one proposing the fewest dissimilar pairs: 16 bands x 6 rows for
0.8 and 128 permutations. datasketch's own choice (minimising equal-weighted false-positive and false-negative
areas) gave 9 x 13, which proposed only ~69% of the pairs at true Jaccard 0.85, so about a fifth of real near
duplicates were never compared. What remains is the estimator's own noise (standard error ~0.03 with 128
permutations): ~94% of pairs at 0.85 and ~99.6% at 0.9 are caught (tests/test_data_dedup_recall.py measures it).

Two ways in: `Deduplicator.check(id, text)` for a stream in one process, and for the pipeline
`signature_batch(texts)` (per part, in parallel) then `decide(...)` (one global pass over all parts).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from pocketlm.data.records import DataPipelineError

SCHEME = "affine32"  # datasketch >= 2.0 hashing scheme, fixed so signatures are comparable
_WS = re.compile(r"\s+")
_NONWORD = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def exact_hash(text: str) -> str:
    return hashlib.sha1(normalize(text).encode("utf-8")).hexdigest()


def shingles(text: str, n: int) -> list[bytes]:
    ws = _NONWORD.sub(" ", normalize(text)).split()
    if len(ws) < n:
        return [" ".join(ws).encode("utf-8")]
    return list({" ".join(ws[i:i + n]).encode("utf-8") for i in range(len(ws) - n + 1)})


@dataclass
class DedupConfig:
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    exact: bool = True
    near: bool = True
    max_miss: float = 0.01     # LSH: largest chance that a pair at exactly `threshold` is never proposed

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise DataPipelineError(f"dedup threshold must be in (0, 1], got {self.threshold}")
        if not isinstance(self.num_perm, int) or self.num_perm < 2:
            raise DataPipelineError(f"dedup num_perm must be an integer >= 2, got {self.num_perm!r}")
        if not isinstance(self.ngram, int) or self.ngram < 1:
            raise DataPipelineError(f"dedup ngram must be an integer >= 1, got {self.ngram!r}")
        if not 0.0 < self.max_miss < 1.0:
            raise DataPipelineError(f"dedup max_miss must be in (0, 1), got {self.max_miss}")

    @property
    def bands_rows(self) -> tuple[int, int]:
        return lsh_params(self.threshold, self.num_perm, self.max_miss)

    def as_dict(self) -> dict:
        b, r = self.bands_rows
        return {"threshold": self.threshold, "num_perm": self.num_perm, "ngram": self.ngram, "seed": self.seed,
                "exact": self.exact, "near": self.near, "max_miss": self.max_miss, "bands": b, "rows": r}


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Chance that LSH with `bands` x `rows` proposes a pair of Jaccard `similarity`: 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - similarity ** rows) ** bands


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, max_miss: float = 0.01) -> tuple[int, int]:
    """(bands, rows) for recall at `threshold`: among the splits with b * r <= num_perm that propose a pair at the
    threshold with probability >= 1 - max_miss, the one proposing the fewest dissimilar pairs (the smallest area
    under the candidate curve between similarity 0 and the threshold). When no split reaches 1 - max_miss, the
    one with the highest probability at the threshold."""
    grid = [threshold * (i + 0.5) / 200 for i in range(200)]
    best, fallback = None, None
    for rows in range(1, num_perm + 1):
        most = num_perm // rows
        p = candidate_probability(threshold, most, rows)
        if fallback is None or p > fallback[0]:
            fallback = (p, most, rows)
        if p < 1.0 - max_miss:
            continue
        # with `rows` fixed, more bands only add candidates: take the fewest that reach the recall
        bands = next(b for b in range(1, most + 1) if candidate_probability(threshold, b, rows) >= 1.0 - max_miss)
        fp_area = sum(candidate_probability(s, bands, rows) for s in grid)
        if best is None or fp_area < best[0]:
            best = (fp_area, bands, rows)
    chosen = best if best is not None else fallback
    return chosen[1], chosen[2]


def signature(text: str, cfg: DedupConfig) -> np.ndarray:
    from datasketch import MinHash

    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)
    m.update_batch(shingles(text, cfg.ngram))
    return m.hashvalues.astype(np.uint64)


def signature_batch(texts: list[str], cfg: DedupConfig) -> tuple[list[str], np.ndarray]:
    """(exact hashes, (len, num_perm) uint64 signatures) for a batch of texts."""
    hashes = [exact_hash(t) for t in texts]
    sigs = np.stack([signature(t, cfg) for t in texts]) if texts and cfg.near else \
        np.zeros((len(texts), cfg.num_perm), np.uint64)
    return hashes, sigs


@dataclass
class Deduplicator:
    """Streaming dedup: `check(id, text or (hash, signature))` -> None to keep, or the reason to drop."""
    cfg: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self):
        from datasketch import MinHashLSH

        self._exact: dict[str, str] = {}
        self._sigs: dict[str, np.ndarray] = {}
        self._labels: dict[str, str] = {}
        self._lsh = MinHashLSH(num_perm=self.cfg.num_perm, params=self.cfg.bands_rows)
        self.stats = {"exact": 0, "near": 0, "kept": 0}

    def check_signed(self, doc_id: str, h: str, sig: np.ndarray, label: str | None = None) -> str | None:
        """`doc_id` must be unique in the stream; `label` (default doc_id) names it in other documents' reasons."""
        from datasketch import MinHash

        label = label or doc_id
        if self.cfg.exact:
            if h in self._exact:
                self.stats["exact"] += 1
                return f"dedup:exact_of:{self._exact[h]}"
            self._exact[h] = label
        if self.cfg.near:
            m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, hashvalues=sig, scheme=SCHEME)
            best = None
            for cand in sorted(self._lsh.query(m)):
                sim = float(np.mean(self._sigs[cand] == sig))
                if sim >= self.cfg.threshold and (best is None or sim > best[1]):
                    best = (cand, sim)
            if best is not None:
                self.stats["near"] += 1
                return f"dedup:near_dup_of:{self._labels[best[0]]}:{best[1]:.3f}"
            if doc_id in self._sigs:
                doc_id = f"{doc_id}#{len(self._sigs)}"
            self._labels[doc_id] = label
            self._lsh.insert(doc_id, m)
            self._sigs[doc_id] = sig
        self.stats["kept"] += 1
        return None

    def check(self, doc_id: str, text: str) -> str | None:
        return self.check_signed(doc_id, exact_hash(text), signature(text, self.cfg))
