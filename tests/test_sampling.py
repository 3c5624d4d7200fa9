"""Sampling: every processor equals transformers' warper (same masks, same values); `sample` draws from the same
distribution as the processors + softmax (`candidates`: the same tokens, probabilities within float rounding,
without sorting the vocabulary) and keeps its contracts (greedy = argmax, same seed = same draws, filtered tokens
are never drawn, bad settings raise)."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pocketlm.engine.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    candidates,
    draw,
    make_generator,
    process_logits,
    sample,
)
from pocketlm.errors import GenerationError

V = 257


def random_logits(seed, batch=4, vocab=V, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * scale
    logits[:, :8] = logits[:, :1]  # ties, so the tie rules are compared too
    return logits


def assert_same(ours, theirs):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different masks"
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(seed, penalty):
    logits = random_logits(seed)
    seen = torch.randint(0, V, (4, 30), generator=torch.Generator().manual_seed(seed + 100))
    seen[:, :5] = seen[:, :1]  # repeated ids are penalised once
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    assert_same(apply_repetition_penalty(logits, seen, penalty), theirs)
    # one sequence, (V,) logits and a plain list of ids
    assert_same(apply_repetition_penalty(logits[0], seen[0].tolist(), penalty), theirs[0])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(temperature):
    logits = random_logits(0)
    assert_same(apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(None, logits))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 5, 8, 50, V, V + 10])
def test_top_k_matches_hf(seed, k):
    logits = random_logits(seed)
    assert_same(apply_top_k(logits, k), TopKLogitsWarper(k)(None, logits))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999, 1.0])
def test_top_p_matches_hf(seed, p):
    logits = random_logits(seed)
    assert_same(apply_top_p(logits, p), TopPLogitsWarper(p)(None, logits))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.99])
def test_min_p_matches_hf(seed, min_p):
    logits = random_logits(seed)
    assert_same(apply_min_p(logits, min_p), MinPLogitsWarper(min_p)(None, logits))


@pytest.mark.parametrize("seed", range(3))
def test_chain_matches_hf_in_hf_order(seed):
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    logits = random_logits(seed, batch=1)
    seen = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(seed))
    theirs = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(40),
                 TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)):
        theirs = proc(seen, theirs)
    assert_same(process_logits(logits[0], params, seen[0]), theirs[0])


def test_off_values_are_identity():
    logits = random_logits(1)
    assert apply_top_k(logits, 0) is logits
    assert apply_top_p(logits, 1.0) is logits
    assert apply_min_p(logits, 0.0) is logits
    assert apply_repetition_penalty(logits, [1, 2, 3], 1.0) is logits
    assert torch.equal(apply_repetition_penalty(logits, [], 1.5), logits)


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = random_logits(2, batch=1)[0]
    params = SamplingParams(temperature=0, top_k=3, top_p=0.5, seed=1)
    assert sample(logits, params, None) == int(torch.argmax(logits))
    assert sample(logits, params, make_generator(SamplingParams(seed=99))) == int(torch.argmax(logits))


def test_greedy_applies_the_repetition_penalty():
    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    assert sample(logits, SamplingParams(temperature=0), None) == 1
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), None, seen_ids=[1]) == 2


def draws(logits, params, n=50):
    g = make_generator(params)
    return [sample(logits, params, g) for _ in range(n)]


def test_same_seed_same_draws_different_seeds_differ():
    logits = torch.zeros(V)  # uniform: maximal entropy
    assert draws(logits, SamplingParams(seed=7)) == draws(logits, SamplingParams(seed=7))
    assert draws(logits, SamplingParams(seed=7)) != draws(logits, SamplingParams(seed=8))


def test_filtered_tokens_are_never_drawn():
    logits = random_logits(3, batch=1, scale=0.5)[0]
    top5 = set(torch.topk(logits, 5).indices.tolist())
    assert set(draws(logits, SamplingParams(top_k=5, seed=0), n=300)) <= top5
    logits = torch.tensor([0.0, 0.0, -math.inf, 0.0, -math.inf])
    assert set(draws(logits, SamplingParams(seed=1), n=200)) == {0, 1, 3}


def test_sampling_follows_the_softmax():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    counts = torch.bincount(torch.tensor(draws(logits, SamplingParams(seed=3), n=n)), minlength=4).float() / n
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_params_are_frozen_and_normalised():
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[5])
    assert params.stop == ("a", "b") and params.stop_token_ids == (5,)
    assert SamplingParams(stop="x").stop == ("x",)
    hash(params)
    with pytest.raises(AttributeError):
        params.temperature = 2.0


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("min_p", 1.0), ("min_p", -0.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("seed", 1.5), ("seed", "42"),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
    ("stop", [""]), ("stop", ["x"] * 17), ("stop", [1]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", "abc"),
])
def test_bad_settings_raise_generation_error_naming_the_field(field, value):
    with pytest.raises(GenerationError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(temperature=2), dict(top_k=0), dict(top_p=1.0), dict(min_p=0.0),
    dict(repetition_penalty=0.5), dict(seed=0), dict(max_tokens=1), dict(stop=["x"] * 16), dict(stop_token_ids=[0]),
])
def test_edge_settings_are_accepted(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
@pytest.mark.parametrize("tiny", [1e-39, 5e-324])
def test_tiny_positive_temperature_or_penalty_stays_finite(field, tiny):
    """A positive but tiny divisor must not overflow the float32 logits (it gave inf -> multinomial error -> 500)."""
    from pocketlm.engine.sampling import MIN_DIVISOR, apply_repetition_penalty, apply_temperature
    logits = torch.tensor([3.0, -2.0, 1.0, 0.5])
    out = apply_temperature(logits, tiny) if field == "temperature" else apply_repetition_penalty(logits, [0, 1], tiny)
    assert torch.isfinite(out).all() and MIN_DIVISOR == 1e-6
    probs = torch.softmax(out, -1)
    assert torch.isfinite(probs).all() and int(probs.argmax()) == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.7), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_p=0.5),
    dict(temperature=0.8, top_k=40, top_p=0.95), dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, min_p=0.1), dict(temperature=0.9, top_k=7), dict(temperature=2.0, top_p=0.999),
    dict(temperature=0.5, top_p=0.3, repetition_penalty=1.3),
])
@pytest.mark.parametrize("vocab", [257, 32064])
def test_candidates_are_the_processed_distribution(seed, kwargs, vocab):
    # the tokens `sample` can draw and their probabilities equal the reference chain's (HF's warpers): the
    # same support, probabilities equal to float rounding; on a large vocabulary the top-p search grows K
    logits = random_logits(seed, batch=1, vocab=vocab, scale=4.0 if vocab > 1000 else 3.0)[0]
    params = SamplingParams(**kwargs)
    seen = [3, 9, 100]
    ref = torch.softmax(process_logits(logits, params, seen), dim=-1)
    ids, probs = candidates(logits, params, seen)
    full = torch.zeros(vocab) if ids is not None else probs
    if ids is not None:
        full[ids] = probs
    diff = (full > 0) != (ref > 0)
    if params.top_p <= 0.95:
        assert not diff.any(), "different support"
    else:  # a nucleus of ~all 32k tokens: its last token is decided by the 7th digit of float32 sums (HF's run
        # ascending over the whole vocabulary, ours descending); such a token's probability is ~1e-7
        assert int(diff.sum()) <= 2 and float(ref[diff].sum() + full[diff].sum()) < 1e-5
    torch.testing.assert_close(full, ref, atol=1e-6, rtol=1e-4)


def test_draw_follows_the_probabilities_and_skips_zeros():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 6000
    got = torch.bincount(torch.tensor([draw(probs, g) for _ in range(n)]), minlength=6).float() / n
    assert got[0] == got[2] == got[5] == 0
    torch.testing.assert_close(got, probs, atol=0.03, rtol=0)
    for bad in (torch.tensor([float("nan"), 1.0]), torch.zeros(3)):
        with pytest.raises(GenerationError, match="cannot sample"):
            draw(bad, g)
