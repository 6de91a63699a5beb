"""Sampling: temperature, top-k, top-p (nucleus) and min-p filters, and penalties over the
generated tokens, with the arguments checked once, before generation starts.

Written here rather than imported from mlx-lm: importing any of mlx-lm imports transformers and
torch (seconds at start-up). The filters keep the semantics of mlx-lm's `make_sampler` (the
sampler the peers' users know): top-p keeps the smallest set of most likely tokens whose mass
reaches p, min-p keeps tokens at least min_p times as likely as the top one, top-k the k most
likely; the survivors are sampled at temperature `temp`.

The Qwen3.5 model cards recommend presence_penalty 1.5 with OpenAI semantics, which count every
token generated so far (mlx-lm's penalty processors look at a window of recent tokens); the
counts are kept running instead of rescanning the history.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]  # log-probabilities [1, vocab] -> token [1]
Distribution = Callable[[mx.array], mx.array]  # log-probabilities -> sampled-from log-probs
MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    keys: KeySequence | None = None,
) -> Sampler:
    """A sampler of log-probabilities [1, vocab]; greedy when `temp` is 0. Draws with MLX's
    global generator, or with `keys` (one request's own)."""
    distribution = make_distribution(temp, top_p, top_k, min_p)
    if distribution is None:
        return greedy

    def sample(logprobs: mx.array) -> mx.array:
        key = None if keys is None else keys.next()
        return mx.random.categorical(distribution(logprobs), key=key)

    return sample


class KeySequence:
    """A random generator of one's own that draws as MLX's global one does: seeded as
    `mx.random.seed(seed)` seeds it, split once per draw (mlx/random.cpp `KeySequence`). A
    request sampled with it gets the tokens it gets alone after `mx.random.seed(seed)`, whatever
    other requests draw meanwhile."""

    def __init__(self, seed: int):
        check_seed(seed)
        self.key = mx.random.key(seed)

    def next(self) -> mx.array:
        self.key, drawn = mx.random.split(self.key)
        return drawn


def make_distribution(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Distribution | None:
    """What `make_sampler` draws from: log-probabilities [..., vocab] -> the normalised
    log-probabilities of the filtered, tempered distribution (None when `temp` is 0: greedy).
    Speculative sampling needs it to accept or reject drafted tokens."""
    check_sampling(temp, top_p, top_k, min_p)
    if temp == 0:
        return None

    def distribution(logprobs: mx.array) -> mx.array:
        if top_p < 1.0:
            logprobs = keep_top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = keep_min_p(logprobs, min_p)
        if top_k > 0:
            logprobs = keep_top_k(logprobs, top_k)
        tempered = logprobs * (1.0 / temp)
        return tempered - mx.logsumexp(tempered, axis=-1, keepdims=True)

    return distribution


def keep_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """The most likely tokens whose probabilities sum to at least `top_p`; the rest -inf."""
    ordered = mx.sort(logprobs, axis=-1)  # ascending
    probs = mx.exp(ordered.astype(mx.float32))
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    dropped = (mass_above >= top_p * (mass_above[..., :1] + probs[..., :1])).sum(
        axis=-1, keepdims=True
    )  # the least likely tokens, the rest already reach top_p
    threshold = mx.take_along_axis(ordered, dropped, axis=-1)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def keep_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Tokens at least `min_p` times as likely as the most likely one; the rest -inf."""
    floor = logprobs.max(axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs < floor, -mx.inf, logprobs)


def keep_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """The `top_k` most likely tokens; the rest -inf."""
    if top_k >= logprobs.shape[-1]:
        return logprobs
    dropped = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(-mx.inf, logprobs.dtype), axis=-1)


def check_sampling(temp, top_p, top_k, min_p) -> None:
    """ValueError naming the argument and its range, for a value the sampler cannot use."""
    _check_number("temp", temp, lambda t: t >= 0, ">= 0 (0 decodes greedily, e.g. 0.7 samples)")
    _check_number("top_p", top_p, lambda p: 0 < p <= 1, "in (0, 1] (1.0 keeps every token)")
    _check_number("min_p", min_p, lambda p: 0 <= p <= 1, "in [0, 1] (0 keeps every token)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a whole number >= 0 (0 keeps every token), got {top_k!r}")


def check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number in [0, 2**64 - 1], got {seed!r}")


def _check_number(name: str, value, valid: Callable[[float], bool], hint: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and valid(value)):
        raise ValueError(f"{name} must be a finite number {hint}, got {value!r}")


class Penalties:
    """A logits processor f(generated tokens, logits [1, vocab]) -> logits.

    presence:   logit -= presence  if the token was generated at least once
    frequency:  logit -= frequency * (times generated)
    repetition: logit /= repetition if positive, *= repetition if negative (CTRL / HF), for
                tokens generated at least once
    """

    def __init__(self, repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0):
        _check_number("repetition_penalty", repetition, lambda r: r > 0, "> 0 (1.0 is off)")
        for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            _check_number(name, value, lambda _: True, "(0 is off)")
        self.repetition, self.presence, self.frequency = repetition, presence, frequency
        self.counts: mx.array | None = None  # [vocab] float32
        self.counted: list[int] = []  # the tokens `counts` holds

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        """`generated` extends the previous call's tokens, or rewrites their tail (speculative
        decoding scores drafted tokens, then keeps only those accepted)."""
        if self.counts is None:
            self.counts = mx.zeros((logits.shape[-1],), dtype=mx.float32)
        same = min(len(self.counted), len(generated))
        while same and self.counted[same - 1] != generated[same - 1]:
            same -= 1
        if dropped := self.counted[same:]:
            self.counts = self.counts.at[mx.array(dropped)].add(-1.0)
        if new := generated[same:]:
            self.counts = self.counts.at[mx.array(new)].add(1.0)
        del self.counted[same:]
        self.counted.extend(new)
        appeared = self.counts > 0
        logits = logits.astype(mx.float32)
        if self.repetition != 1.0:
            penalised = mx.where(logits < 0, logits * self.repetition, logits / self.repetition)
            logits = mx.where(appeared, penalised, logits)
        return logits - self.presence * appeared - self.frequency * self.counts
