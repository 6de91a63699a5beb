"""Train a checkpoint's MTP head on the model's own greedy continuations, so that speculative
decoding can be measured (and tested) with a head that drafts well, without real weights.

At each position t of a sequence x (a random prompt and the model's greedy continuation), the
head takes the model's final-normed hidden state h_t and the token x_{t+1} and must give x_{t+2}
(docs/ARCHITECTURE.md §6). Only the head's parameters train (MLX autodiff, Adam), on whole
sequences through the causal forward without a cache; the embeddings and the output head stay
the model's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

PROMPT_LENGTH = 8
CONTINUATION = 24  # greedy tokens after each prompt


def prompts(count: int, seed: int, below: int) -> mx.array:
    """Random ids [count, PROMPT_LENGTH] below `below` (e.g. the first special token)."""
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, below, size=(count, PROMPT_LENGTH)))


def greedy_sequences(model, prompt_ids: mx.array) -> mx.array:
    """[B, PROMPT_LENGTH + CONTINUATION]: the prompts and the model's greedy continuations."""
    cache = model.make_cache()
    logits = model(prompt_ids, cache=cache)
    tokens = [prompt_ids]
    for _ in range(CONTINUATION):
        tokens.append(mx.argmax(logits[:, -1:], axis=-1))  # [B, 1]
        logits = model(tokens[-1], cache=cache, check_ids=False)
    return mx.concatenate(tokens, axis=1)


def head_inputs(model, sequences: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """(hidden [B, N-2, H] at t, tokens [B, N-2] at t+1, targets [B, N-2] at t+2, mask [N-2]
    of the positions whose target the model generated, not the random prompt)."""
    _, hidden = model(sequences, return_hidden=True)
    positions = mx.arange(sequences.shape[1] - 2)
    generated = (positions + 2 >= PROMPT_LENGTH).astype(mx.float32)
    return hidden[:, :-2], sequences[:, 1:-1], sequences[:, 2:], generated


def train_head(model, sequences: mx.array, steps: int = 60, learning_rate: float = 1e-2) -> None:
    """Trains `model.mtp` in place, full batch; nothing else changes."""
    hidden, next_ids, targets, generated = head_inputs(model, sequences)
    mx.eval(hidden)

    def loss() -> mx.array:
        logits = model.mtp_logits(hidden, next_ids)  # [B, N-2, vocab]
        losses = nn.losses.cross_entropy(logits, targets, reduction="none")  # [B, N-2]
        return (losses * generated).sum() / (generated.sum() * losses.shape[0])

    loss_and_grad = nn.value_and_grad(model.mtp, loss)
    optimizer = optim.Adam(learning_rate=learning_rate)
    for _ in range(steps):
        _, grads = loss_and_grad()
        optimizer.update(model.mtp, grads)
        mx.eval(model.mtp.parameters(), optimizer.state)


def head_accuracy(model, sequences: mx.array) -> float:
    """How often the head's top token is x_{t+2}, over the generated positions."""
    hidden, next_ids, targets, generated = head_inputs(model, sequences)
    right = mx.argmax(model.mtp_logits(hidden, next_ids), axis=-1) == targets  # [B, N-2]
    return ((right * generated).sum() / (generated.sum() * right.shape[0])).item()
