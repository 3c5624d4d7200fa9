"""Logits processing and sampling for one sequence.

`SamplingParams` holds every knob a request can set and checks it once, in `__post_init__`. The processors are
pure functions over a logits tensor of shape (..., V) and follow HF transformers' warpers exactly (same masks,
same values; tests/test_sampling.py compares them), applied in HF's order:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> multinomial

Greedy decoding (temperature 0) is argmax over the repetition-penalised logits; top-k/top-p/min-p never remove
the argmax, so they are skipped, and the seed is ignored.

Reference: transformers `generation/logits_process.py` (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper); the repetition penalty is CTRL's (Keskar et al. 2019,
https://arxiv.org/abs/1909.05858) with HF's sign rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from pocketlm.errors import GenerationError

MAX_STOP_STRINGS = 16


# The repetition penalty a model file declares (`model_repetition_penalty`): llama.cpp's GGUF keys and HF's
# generation_config.json field. pocketlm's penalty covers the whole context (prompt + output), which is
# penalty_last_n = -1 in llama.cpp's terms; a file that declares another window is not followed (see below).
GGUF_PENALTY_REPEAT = "general.sampling.penalty_repeat"
GGUF_PENALTY_LAST_N = "general.sampling.penalty_last_n"


def declared_repetition_penalty(value, last_n=-1) -> float | None:
    """The repetition penalty a file declares, as pocketlm applies it, or None (none declared, 1.0, a window
    other than the whole context, or a value that is not a number > 0). `last_n` is llama.cpp's
    penalty_last_n (-1: the whole context; 0: penalties off; N: the last N tokens, which pocketlm does not
    implement, so such a file's penalty is not applied rather than applied differently)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    if last_n != -1 or value == 1.0:
        return None
    return float(value)


def penalized_ids(sequence: Sequence[int], stop_ids) -> Sequence[int]:
    """The ids the repetition penalty covers: the sequence (prompt + output) less the stop ids. A chat prompt holds
    its end-of-turn token once per turn, so penalizing it holds back the reply's own end: measured on the distilled
    default model at 1.2, replies to "Hello, who are you?" ran to the token limit (HF transformers penalizes it;
    pocketlm does not)."""
    if not stop_ids:
        return sequence  # no copy: this runs once per generated token
    return [t for t in sequence if t not in stop_ids]


def model_repetition_penalty(model) -> float:
    """The repetition penalty generation uses when the caller names none: the one the model's file declares
    (`model.declared_repetition_penalty`, set by the GGUF and checkpoint loaders), else 1.0 (off). As in llama.cpp
    (general.sampling.* keys) and HF transformers (generation_config.json), what the caller sets always wins."""
    value = getattr(model, "declared_repetition_penalty", None)
    return 1.0 if value is None else float(value)


@dataclass(frozen=True)
class SamplingParams:
    """Settings for one generation request.

    Args:
        temperature: softmax temperature; 0 means greedy (argmax), which ignores `seed`.
        top_k: keep only the k most likely tokens; 0 turns it off.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability sums to at least top_p; 1 = off.
        min_p: drop tokens whose probability is below min_p times the top token's; 0 = off.
        repetition_penalty: CTRL penalty over the tokens of prompt + output (divide positive logits, multiply
            negative ones) except the ids that end generation (`penalized_ids`); 1 = off, > 1 discourages repeats.
        seed: seeds the sampler's `torch.Generator`; the same seed gives the same output. None = random.
        max_tokens: most tokens to generate (the stop token counts).
        stop: strings that end generation; the output is cut before the first one. At most 16, none empty.
        stop_token_ids: token ids that end generation, added to the caller's defaults (e.g. `<|end|>`).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)

    def __post_init__(self):
        def bad(name, value, rule):
            raise GenerationError(f"{name}={value!r} is invalid: {rule}")

        def is_number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_number(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 = off)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not is_number(self.min_p) or not 0 <= self.min_p < 1:
            bad("min_p", self.min_p, "must be in [0, 1)")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0 (1 = off)")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", self.seed, "must be an integer or None")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Iterable):
            bad("stop", self.stop, "must be a string or a list of strings")
        stop = tuple(stop)
        if len(stop) > MAX_STOP_STRINGS:
            bad("stop", self.stop, f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
        if any(not isinstance(s, str) or s == "" for s in stop):
            bad("stop", self.stop, "every stop string must be a non-empty string")
        if not isinstance(self.stop_token_ids, Iterable) or isinstance(self.stop_token_ids, str):
            bad("stop_token_ids", self.stop_token_ids, "must be a list of token ids")
        ids = tuple(self.stop_token_ids)
        if any(not is_int(i) or i < 0 for i in ids):
            bad("stop_token_ids", self.stop_token_ids, "every id must be an integer >= 0")
        # normalise to tuples so the frozen dataclass stays hashable and immutable
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# the smallest temperature / repetition penalty the arithmetic uses: dividing float32 logits by a positive but tiny
# value (1e-39, 5e-324) would overflow to inf and poison the softmax; at 1e-6 any logit gap above ~1e-4 is already
# a certain choice, so the clamp changes no distribution anyone can tell apart from the limit
MIN_DIVISOR = 1e-6


def apply_repetition_penalty(logits: torch.Tensor, seen_ids, penalty: float) -> torch.Tensor:
    """CTRL/HF repetition penalty: for every id in `seen_ids`, divide its logit by `penalty` if positive, else
    multiply. Each id is penalised once however often it occurred. logits: (V,) or (B, V); seen_ids: ids in
    range, a list or a LongTensor shaped (N,) or (B, N)."""
    if penalty == 1.0:
        return logits
    seen = torch.as_tensor(seen_ids, dtype=torch.long, device=logits.device)
    if seen.numel() == 0:
        return logits
    squeeze = logits.dim() == 1
    scores = logits.unsqueeze(0) if squeeze else logits  # (B, V)
    seen = seen.reshape(1, -1) if seen.dim() == 1 else seen  # (B or 1, N)
    seen = seen.expand(scores.shape[0], -1)
    out = scores.scatter(1, seen, penalized_scores(torch.gather(scores, 1, seen), penalty))
    return out.squeeze(0) if squeeze else out


def penalized_scores(score: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty on the logits of seen ids: divided by `penalty` if positive, else multiplied (the
    penalty at least MIN_DIVISOR). Shared by apply_repetition_penalty and the server's batched pass."""
    penalty = max(penalty, MIN_DIVISOR)
    return torch.where(score < 0, score * penalty, score / penalty)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (> 0; at least MIN_DIVISOR, so the result stays finite)."""
    return logits / max(temperature, MIN_DIVISOR)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (ties with the k-th are kept, as in HF); the rest become -inf. k=0 is a no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose cumulative probability is <= 1 - p; the most likely
    token is always kept. p=1 is a no-op."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cum_probs <= (1 - p)
    sorted_remove[..., -1:] = False  # keep at least one token
    remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
    return logits.masked_fill(remove, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the top token's probability. min_p=0 is a no-op."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)  # keep at least one token
    return logits.masked_fill(remove, -math.inf)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen_ids=()) -> torch.Tensor:
    """All processors in HF's order, for sampling (temperature > 0). Works in float32."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, params.repetition_penalty)
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device`, seeded from `params.seed` (a random seed when None)."""
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen_ids=()) -> int:
    """Pick the next token id from one position's logits (V,).

    Greedy when `params.temperature == 0` (the generator is not used); otherwise a draw from the distribution
    that `process_logits` + softmax define (`candidates`: the same tokens and probabilities, found without
    sorting the vocabulary), by inverse CDF with one uniform number from `generator`. `seen_ids` (prompt +
    output so far) feed the repetition penalty.
    """
    if params.greedy:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
        return int(torch.argmax(logits, dim=-1))
    ids, probs = candidates(logits, params, seen_ids)
    i = draw(probs, generator)
    return i if ids is None else int(ids[i])


def candidates(logits: torch.Tensor, params: SamplingParams, seen_ids=()) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens that sampling can pick and their probabilities, for one position's logits (V,): what
    `torch.softmax(process_logits(...))` gives, without the full sorts of `apply_top_p` (a sort of 32-49k
    logits takes milliseconds, more than a small model's whole decode step). Returns (ids (n,) int64 or None
    for the whole vocabulary, probabilities (n,) float32 summing to 1).

    - top-k: every logit >= the k-th largest (ties kept, as `apply_top_k`).
    - top-p: the tokens whose probability mass ranked above them is < p (the rule of `apply_top_p`: it drops
      a token when the mass at and below it is <= 1 - p); without top-k only the top K tokens are ranked,
      K growing (64, 512, 4096, ... V) until their mass reaches p, so everything past them is dropped.
    - min-p: probabilities >= min_p times the largest (as `apply_min_p`).
    The most likely token is always kept. Differences from the reference are float rounding only.
    """
    lg = apply_temperature(apply_repetition_penalty(logits.float(), seen_ids, params.repetition_penalty),
                           params.temperature)
    V = lg.shape[-1]
    ids = None
    if 0 < params.top_k < V:
        kth = torch.topk(lg, params.top_k).values[-1]
        ids = torch.nonzero(lg >= kth).squeeze(1)
        lg = lg[ids]
    if params.top_p < 1.0:
        probs = torch.softmax(lg, dim=-1)
        n = probs.shape[0]
        K = min(n, 64)
        while True:
            top, order = torch.topk(probs, K)  # descending
            above = torch.cumsum(top, 0) - top  # the mass ranked above each of them
            if K == n or float(above[-1] + top[-1]) >= params.top_p:
                break
            K = min(n, K * 8)
        keep = above < params.top_p
        keep[0] = True
        order = order[keep]
        ids = order if ids is None else ids[order]
        lg = lg[order]
    if params.min_p > 0.0:
        probs = torch.softmax(lg, dim=-1)
        keep = probs >= params.min_p * probs.max()
        keep[torch.argmax(probs)] = True
        if not bool(keep.all()):
            idx = torch.nonzero(keep).squeeze(1)
            ids = idx if ids is None else ids[idx]
            lg = lg[idx]
    return ids, torch.softmax(lg, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """An index drawn from probabilities (n,) by inverse CDF: one uniform number from `generator`, the first
    index whose cumulative probability exceeds it (tokens of probability 0 are never drawn)."""
    cdf = torch.cumsum(probs.float(), 0)
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0.0):
        raise GenerationError(f"cannot sample: the probabilities sum to {total} (NaN or infinite logits?)")
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    i = int(torch.searchsorted(cdf, torch.tensor([u * total], dtype=cdf.dtype), right=True)[0])
    if i >= cdf.shape[0] or float(probs[i]) <= 0.0:  # u * total rounded up to the end: the last possible token
        i = int(torch.nonzero(probs > 0)[-1, 0])
    return i
