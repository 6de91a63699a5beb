"""The whole Qwen3.5 model as users load it: today the text decoder; the vision tower and the
MTP head join it in later stages, their tensors held meanwhile in `pending_weights`."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .text import LanguageModel


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text, config.tie_word_embeddings)
        # Vision and MTP tensors, unused by the text path but kept (not silently dropped) so
        # that conversion writes them out. A read-only mapping so nn.Module does not treat
        # them as parameters.
        self.pending_weights: Mapping[str, mx.array] = MappingProxyType({})

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        """inputs [B, T] token ids -> logits [B, T, vocab]."""
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    @property
    def layers(self) -> list:
        return self.language_model.model.layers

    def make_cache(self) -> list:
        return self.language_model.make_cache()

    @staticmethod
    def cast_predicate(name: str) -> bool:
        """Whether a weight follows the model dtype; norms and A_log stay float32."""
        return not (name.endswith("norm.weight") or name.endswith("A_log"))
