"""The sampler against a numpy reference: which tokens each filter keeps, the distribution it
samples from, and clear errors for arguments it cannot use."""

import math

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.sampling import (
    Penalties,
    check_seed,
    keep_min_p,
    keep_top_k,
    keep_top_p,
    make_sampler,
)

VOCAB = 40


def logprobs(seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=2.0, size=VOCAB)
    return logits - np.log(np.exp(logits).sum())


def kept(filtered: mx.array) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.array(filtered)[0])).tolist())


def reference_top_p(lp: np.ndarray, p: float) -> set[int]:
    """The fewest most likely tokens whose probabilities sum to at least p."""
    order = np.argsort(-lp)
    mass = np.cumsum(np.exp(lp[order]))
    return set(order[: int(np.searchsorted(mass, p * mass[-1])) + 1].tolist())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(seed, p):
    lp = logprobs(seed)
    assert kept(keep_top_p(mx.array(lp[None], dtype=mx.float32), p)) == reference_top_p(lp, p)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 17, VOCAB, VOCAB + 5])
def test_top_k_keeps_the_k_most_likely(seed, k):
    lp = logprobs(seed)
    expected = set(np.argsort(-lp)[:k].tolist())
    assert kept(keep_top_k(mx.array(lp[None], dtype=mx.float32), k)) == expected


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_keeps_tokens_near_the_top_one(seed, min_p):
    lp = logprobs(seed)
    probs = np.exp(lp)
    expected = set(np.flatnonzero(probs >= min_p * probs.max() * (1 - 1e-6)).tolist())
    assert kept(keep_min_p(mx.array(lp[None], dtype=mx.float32), min_p)) == expected


def test_samples_follow_the_filtered_tempered_distribution():
    lp = logprobs(7)
    temp, top_k, draws = 0.7, 5, 40_000
    top = np.argsort(-lp)[:top_k]
    expected = np.zeros(VOCAB)
    expected[top] = np.exp(lp[top] / temp)
    expected /= expected.sum()
    mx.random.seed(3)
    sampler = make_sampler(temp=temp, top_k=top_k)
    tokens = np.array(sampler(mx.broadcast_to(mx.array(lp, dtype=mx.float32), (draws, VOCAB))))
    observed = np.bincount(tokens, minlength=VOCAB) / draws
    assert set(np.flatnonzero(observed)) <= set(top.tolist())
    # 40k draws: the standard error of a frequency is at most 0.0025
    np.testing.assert_allclose(observed, expected, atol=0.012)


def test_temperature_zero_is_argmax():
    lp = logprobs(1)
    assert int(make_sampler(0.0)(mx.array(lp[None]))[0]) == int(np.argmax(lp))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("temp", {"temp": -0.1}),
        ("temp", {"temp": math.nan}),
        ("temp", {"temp": math.inf}),
        ("temp", {"temp": "0.7"}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_p", {"top_p": math.nan}),
        ("top_k", {"top_k": -1}),
        ("top_k", {"top_k": 2.5}),
        ("top_k", {"top_k": True}),
        ("min_p", {"min_p": -0.1}),
        ("min_p", {"min_p": 2.0}),
    ],
)
def test_bad_sampling_arguments_are_named(name, kwargs):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        make_sampler(**kwargs)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("repetition_penalty", {"repetition": 0.0}),
        ("repetition_penalty", {"repetition": math.nan}),
        ("presence_penalty", {"presence": math.nan}),
        ("presence_penalty", {"presence": math.inf}),
        ("frequency_penalty", {"frequency": -math.inf}),
        ("frequency_penalty", {"frequency": "1"}),
    ],
)
def test_bad_penalties_are_named(name, kwargs):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        Penalties(**kwargs)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7", True])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="^seed must be"):
        check_seed(seed)
