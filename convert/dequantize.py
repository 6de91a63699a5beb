"""Dequantization of a loaded model, written here rather than taken from mlx-lm (whose
modules import transformers at start-up)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def dequantize_modules(model: nn.Module) -> None:
    """Replaces every quantized Linear and Embedding by a float one holding its dequantized
    weight (lazily; the dtype is that of the scales)."""
    floats = [
        (path, _float_module(module))
        for path, module in model.named_modules()
        if isinstance(module, QUANTIZED)
    ]
    model.update_modules(tree_unflatten(floats))


def dequantized_weight(module: nn.Module) -> mx.array:
    """The float matrix a QuantizedLinear or QuantizedEmbedding holds."""
    return mx.dequantize(
        module.weight,
        module.scales,
        module.biases,
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )


def _float_module(module: nn.Module) -> nn.Module:
    weight = dequantized_weight(module)
    if isinstance(module, nn.QuantizedEmbedding):
        floating = nn.Embedding(*weight.shape)  # [vocabulary, dims]
    else:
        floating = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            floating.bias = module.bias
    floating.weight = weight  # replaces the random initial weight, never evaluated
    return floating
