"""A checkpoint whose MTP head drafts for a tiny test model (the `trained_mtp_checkpoint`
fixture): the head trained by `qwen35_mlx.bench.mtp_training` on the model's own greedy
continuations, written as a Hugging Face checkpoint so that `load()` gives the trained head.
"""

import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen35_mlx.bench.mtp_training import greedy_sequences, head_accuracy, prompts, train_head
from qwen35_mlx.loading import MTP_PREFIX, SHIFTED_NORMS, load_model

from checkpoints import Spec
from helpers import add_mtp_head, mtp_tensors

# Sized to train in under 10 s on two busy CPU cores (full batch: 16 sequences of 32 tokens).
TRAINING_PROMPTS = 16
HELD_OUT_PROMPTS = 16
TRAINING_SEED, HELD_OUT_SEED = 0, 1
BELOW_SPECIAL_TOKENS = 496  # the tiny tokenizer's ordinary ids


def held_out_accuracy(model) -> float:
    """How often the head's top token is x_{t+2} on continuations of unseen prompts."""
    held_out = prompts(HELD_OUT_PROMPTS, HELD_OUT_SEED, BELOW_SPECIAL_TOKENS)
    return head_accuracy(model, greedy_sequences(model, held_out))


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
    training = prompts(TRAINING_PROMPTS, TRAINING_SEED, BELOW_SPECIAL_TOKENS)
    train_head(model, greedy_sequences(model, training))
    return add_mtp_head(target, hf_head_tensors(model))
