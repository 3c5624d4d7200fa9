"""LongRoPE context extension, step 1: search the per-frequency rescale factors (Ding et al. 2024, "LongRoPE").

A model trained at `original` tokens is extended to `target` = s x original tokens by dividing each rotary
frequency i by a factor lambda_i >= 1 (phi3-spec §3.3: inv_freq_i = 1 / (lambda_i * theta^(2i/d))), with the
magnitude m = sqrt(1 + ln(s)/ln(original)) on cos/sin, as the released 128K Phi-3 models do. The factors are
found by the paper's evolutionary search on held-out perplexity at the target length:

- the initial population holds the known schemes, PI (lambda_i = s for every i), NTK-aware scaling
  (lambda_i = s^(2i/(d-2)): theta multiplied by s^(d/(d-2))) and YaRN-style "by parts" (1 for the fast
  frequencies, s for the slow ones, a linear ramp between), plus random monotone mutations of them;
- each generation keeps the best `parents` candidates, and adds mutations (each factor times exp(N(0, sigma)))
  and crossovers (each factor from one of two parents) of them;
- every candidate obeys the paper's constraints: factors >= 1 and non-decreasing with the dimension index
  (slower frequencies are stretched at least as much), so the search space is that of the paper;
- the best candidate ever seen is kept (elitism): the result is never worse than PI or NTK on the same data.

`write_factors(folder, ...)` then stores them in the checkpoint's config.json as the released 128K models do:
`"rope_scaling": {"long_factor": [...], "short_factor": [...], "type": "longrope"}`,
`"original_max_position_embeddings": original`, `"max_position_embeddings": target` (short factors: 1.0, so
sequences up to `original` tokens run exactly as before the extension). Fine-tuning at the new length (the
paper's step 2) is ordinary training with that config and is not part of this module.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pocketlm.config import Phi3Config, RopeScaling
from pocketlm.errors import ConfigError


def pi_factors(n: int, s: float) -> list[float]:
    """Position interpolation: every frequency divided by s."""
    return [float(s)] * n


def ntk_factors(n: int, s: float) -> list[float]:
    """NTK-aware scaling (theta x s^(d/(d-2))) as per-frequency factors: s^(2i/(d-2)), d = 2n."""
    d = 2 * n
    return [float(s) ** (2 * i / (d - 2)) for i in range(n)] if n > 1 else [float(s)]


def yarn_factors(n: int, s: float, lo: float = 0.25, hi: float = 0.75) -> list[float]:
    """YaRN-style by-parts: 1 for the first lo*n (fast) frequencies, s from hi*n on, a linear ramp between."""
    out = []
    for i in range(n):
        t = min(1.0, max(0.0, (i / max(n - 1, 1) - lo) / (hi - lo)))
        out.append(1.0 + t * (s - 1.0))
    return out


def constrain(factors, s_max: float) -> list[float]:
    """The search space: factors in [1, s_max], non-decreasing with the dimension index."""
    out, top = [], 1.0
    for f in factors:
        top = max(top, min(max(float(f), 1.0), s_max))
        out.append(top)
    return out


def extended_config(config: Phi3Config, long_factor, target: int, original: int | None = None) -> Phi3Config:
    """`config` extended to `target` tokens with these long factors (short factors 1.0, switch above original)."""
    original = original or config.max_position_embeddings
    n = config.rotary_dim // 2
    if len(long_factor) != n:
        raise ConfigError(f"{len(long_factor)} long factors for a rotary dimension of {config.rotary_dim} (need {n})")
    if target <= original:
        raise ConfigError(f"target length {target} must exceed the original context {original}")
    return config.replace(max_position_embeddings=target, original_max_position_embeddings=original,
                          rope_scaling=RopeScaling(short_factor=(1.0,) * n, long_factor=tuple(long_factor)),
                          longrope_policy="dynamic")


@torch.inference_mode()
def perplexity(model, windows: list[list[int]], config: Phi3Config) -> float:
    """Perplexity of `model` under `config`'s rotary setting over token windows (each scored whole)."""
    from pocketlm.model import RotaryEmbedding
    saved = model.config, model.rotary_emb
    try:
        model.config = config
        model.rotary_emb = RotaryEmbedding(config).to(next(model.parameters()).device)
        nll, n = 0.0, 0
        for w in windows:
            x = torch.tensor([w], device=next(model.parameters()).device)
            logits = model(x)[0, :-1].float()  # (T-1, V)
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += len(w) - 1
        return math.exp(nll / n)
    finally:
        model.config, model.rotary_emb = saved


@dataclass
class SearchResult:
    """The best long factors found, their perplexity, the baselines' and every generation's best."""
    long_factor: list[float]
    perplexity: float
    baselines: dict[str, float]
    history: list[float] = field(default_factory=list)
    evaluated: int = 0


def search(model, windows: list[list[int]], target: int, *, original: int | None = None, population: int = 8,
           generations: int = 4, parents: int = 3, sigma: float = 0.15, seed: int = 0) -> SearchResult:
    """The evolutionary search of the module docstring over `windows` (held-out token windows, each <= target)."""
    config = model.config
    original = original or config.max_position_embeddings
    if any(len(w) > target for w in windows) or not windows:
        raise ConfigError(f"search needs held-out windows of at most {target} tokens")
    if population < 3 or parents < 1 or parents > population or generations < 0:
        raise ConfigError(f"population {population}, parents {parents}, generations {generations} are invalid")
    n = config.rotary_dim // 2
    s = target / original
    s_max = 2.0 * s  # the paper lets factors pass the plain ratio for the slowest frequencies
    r = random.Random(seed)
    scores: dict[tuple, float] = {}

    def evaluate(f) -> float:
        key = tuple(round(x, 6) for x in f)
        if key not in scores:
            scores[key] = perplexity(model, windows, extended_config(config, list(key), target, original))
        return scores[key]

    def mutate(f):
        return constrain([x * math.exp(r.gauss(0.0, sigma)) for x in f], s_max)

    def cross(a, b):
        return constrain([x if r.random() < 0.5 else y for x, y in zip(a, b)], s_max)

    seeds = {"pi": pi_factors(n, s), "ntk": ntk_factors(n, s), "yarn": yarn_factors(n, s)}
    baselines = {name: evaluate(constrain(f, s_max)) for name, f in seeds.items()}
    baselines["none"] = perplexity(model, windows, config.replace(max_position_embeddings=max(
        target, config.max_position_embeddings)))
    pool = [constrain(f, s_max) for f in seeds.values()]
    while len(pool) < population:
        pool.append(mutate(r.choice(pool[:3])))
    history = []
    for _ in range(generations + 1):
        ranked = sorted(pool, key=evaluate)
        history.append(evaluate(ranked[0]))
        best = ranked[:parents]
        pool = list(best)
        while len(pool) < population:
            pool.append(mutate(r.choice(best)) if r.random() < 0.6 or len(best) < 2 else cross(*r.sample(best, 2)))
    best_key = min(scores, key=scores.get)
    return SearchResult(list(best_key), scores[best_key], baselines, history, len(scores))


def write_factors(folder: str | Path, long_factor, target: int, original: int, short_factor=None) -> dict:
    """Update `folder`/config.json in place with the factors, as the released 128K models store them; return it."""
    path = Path(folder) / "config.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the checkpoint's config.json: {e}") from None
    n = len(long_factor)
    d["rope_scaling"] = {"long_factor": [float(x) for x in long_factor],
                         "short_factor": [float(x) for x in (short_factor or [1.0] * n)], "type": "longrope"}
    d["original_max_position_embeddings"] = int(original)
    d["max_position_embeddings"] = int(target)
    Phi3Config.from_hf_dict(d, source=str(path))  # loads (factor count, values) or raises ConfigError first
    path.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    return d


__all__ = ["SearchResult", "constrain", "extended_config", "ntk_factors", "perplexity", "pi_factors", "search",
           "write_factors", "yarn_factors"]
