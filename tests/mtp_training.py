"""An MTP head trained to draft for a tiny test model (the `trained_mtp_checkpoint` fixture).

The data is the model's own: random prompts and its greedy continuations of them. At each
position t of such a sequence x, the head takes the model's final-normed hidden state h_t and
the token x_{t+1} and must give x_{t+2} (docs/ARCHITECTURE.md §6). Only the head's parameters
train (MLX autodiff, Adam), on whole sequences through the causal forward without a cache; the
embeddings and the output head stay the model's. The result is written as a Hugging Face
checkpoint, so `load()` gives a model whose `mtp` is trained.
"""

import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from qwen35_mlx.loading import MTP_PREFIX, SHIFTED_NORMS, load_model

from checkpoints import Spec
from helpers import add_mtp_head, mtp_tensors

# Sized to train in under 10 s on two busy CPU cores (full batch: 16 sequences of 32 tokens).
PROMPT_LENGTH = 8
CONTINUATION = 24  # greedy tokens after each prompt
TRAINING_PROMPTS = 16
HELD_OUT_PROMPTS = 16
TRAINING_SEED, HELD_OUT_SEED = 0, 1
STEPS = 60
LEARNING_RATE = 1e-2


def prompts(count: int, seed: int) -> mx.array:
    """Random ids [count, PROMPT_LENGTH] below the tiny tokenizer's special tokens."""
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, 496, size=(count, PROMPT_LENGTH)))


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


def train_head(model, sequences: mx.array) -> None:
    """Trains `model.mtp` in place; nothing else changes."""
    hidden, next_ids, targets, generated = head_inputs(model, sequences)
    mx.eval(hidden)

    def loss() -> mx.array:
        logits = model.mtp_logits(hidden, next_ids)  # [B, N-2, vocab]
        losses = nn.losses.cross_entropy(logits, targets, reduction="none")  # [B, N-2]
        return (losses * generated).sum() / (generated.sum() * losses.shape[0])

    loss_and_grad = nn.value_and_grad(model.mtp, loss)
    optimizer = optim.Adam(learning_rate=LEARNING_RATE)
    for _ in range(STEPS):
        _, grads = loss_and_grad()
        optimizer.update(model.mtp, grads)
        mx.eval(model.mtp.parameters(), optimizer.state)


def held_out_accuracy(model) -> float:
    """How often the head's top token is x_{t+2} on continuations of unseen prompts."""
    sequences = greedy_sequences(model, prompts(HELD_OUT_PROMPTS, HELD_OUT_SEED))
    hidden, next_ids, targets, generated = head_inputs(model, sequences)
    right = mx.argmax(model.mtp_logits(hidden, next_ids), axis=-1) == targets  # [B, N-2]
    return ((right * generated).sum() / (generated.sum() * right.shape[0])).item()


def hf_head_tensors(model) -> dict[str, mx.array]:
    """The head under its checkpoint names, norms back to the stored w of 1 + w."""
    tensors = {MTP_PREFIX + name: value for name, value in tree_flatten(model.mtp.parameters())}
    return {
        name: value - 1.0 if name.endswith(SHIFTED_NORMS) else value
        for name, value in tensors.items()
    }


def train_mtp_checkpoint(source: Path, target: Path, spec: Spec = Spec()) -> Path:
    """`target`: the float32 checkpoint `source` (built from `spec`) with a trained MTP head."""
    shutil.copytree(source, target)
    model = load_model(add_mtp_head(target, mtp_tensors(spec)))  # a random head to start from
    train_head(model, greedy_sequences(model, prompts(TRAINING_PROMPTS, TRAINING_SEED)))
    return add_mtp_head(target, hf_head_tensors(model))
