"""The whole Qwen3.5 model as users load it: today the text decoder; the vision tower and the
MTP head join it in later stages, their tensors held meanwhile in `pending_weights`."""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .text import LanguageModel


QUANT_RECIPES = ("hybrid", "uniform")


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text, config.tie_word_embeddings)
        self.set_pending_weights({})

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        """inputs [B, T] token ids -> logits [B, T, vocab]."""
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    def set_pending_weights(self, weights: Mapping[str, mx.array]) -> None:
        """Vision and MTP tensors, unused by the text path but kept (not silently dropped) so
        that conversion writes them out. Held read-only: nn.Module would take a dict for
        parameters."""
        self.pending_weights: Mapping[str, mx.array] = MappingProxyType(dict(weights))

    @property
    def layers(self) -> list:
        return self.language_model.model.layers

    def make_cache(self) -> list:
        return self.language_model.make_cache()

    @staticmethod
    def quant_predicate(recipe: str, bits: int, group_size: int) -> Callable:
        """Decides per module, for `nn.quantize`: False keeps it float, True quantizes it at
        `bits`, a dict overrides the bits (written per layer into the config).

        "uniform": every matrix at `bits`. "hybrid" (default): the DeltaNet per-head gate
        projections `in_proj_a`/`in_proj_b` stay float ([Hv, H]: tiny, and they set decay and
        update rates), `linear_attn.out_proj` (the most quantization-sensitive tensor in
        published per-tensor studies of the 9B) gets 8 bits, the rest `bits`. Norms, A_log,
        dt_bias and conv1d are not matrices and are never quantized.
        """
        if recipe not in QUANT_RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {QUANT_RECIPES}")

        def predicate(path: str, module) -> bool | dict:
            if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
                return False  # input dims must split into whole groups
            if recipe == "uniform":
                return True
            if path.endswith(("linear_attn.in_proj_a", "linear_attn.in_proj_b")):
                return False
            if path.endswith("linear_attn.out_proj") and bits < 8:
                return {"group_size": group_size, "bits": 8}
            return True

        return predicate

    @staticmethod
    def cast_predicate(name: str) -> bool:
        """Whether a weight follows the model dtype; norms and A_log stay float32."""
        return not (name.endswith("norm.weight") or name.endswith("A_log"))
