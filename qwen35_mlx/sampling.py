"""Penalties over the generated tokens; sampling itself is mlx-lm's `make_sampler`.

mlx-lm's penalty processors look at a sliding window of recent tokens (20 by default); the
Qwen3.5 model cards recommend presence_penalty 1.5 with OpenAI semantics, which count every
token generated so far. This keeps running counts instead of rescanning the history.
"""

from __future__ import annotations

import mlx.core as mx


class Penalties:
    """A logits processor f(generated tokens, logits [1, vocab]) -> logits.

    presence:   logit -= presence  if the token was generated at least once
    frequency:  logit -= frequency * (times generated)
    repetition: logit /= repetition if positive, *= repetition if negative (CTRL / HF), for
                tokens generated at least once
    """

    def __init__(self, repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0):
        if repetition <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition}")
        self.repetition, self.presence, self.frequency = repetition, presence, frequency
        self.counts: mx.array | None = None  # [vocab] float32
        self.seen = 0  # generated tokens already counted

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        if self.counts is None:
            self.counts = mx.zeros((logits.shape[-1],), dtype=mx.float32)
        new = generated[self.seen:]
        if new:
            self.counts = self.counts.at[mx.array(new)].add(1.0)
            self.seen = len(generated)
        appeared = self.counts > 0
        logits = logits.astype(mx.float32)
        if self.repetition != 1.0:
            penalised = mx.where(logits < 0, logits * self.repetition, logits / self.repetition)
            logits = mx.where(appeared, penalised, logits)
        return logits - self.presence * appeared - self.frequency * self.counts
