"""A checkpoint's model with its weights still on disk, for conversion and upload checks.

`qwen35_mlx.loading.load_model` evaluates every weight before it returns: converting from it
held the whole float model in memory before the first byte was written. Here the same checks
run (config, shard headers, tensor names and shapes against the model) but each weight stays
a lazy `mx.load` array until the writer evaluates its shard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from qwen35_mlx.loading import (PENDING_PREFIXES, VISION_PREFIX, _cast, _check_weights, _dtype,
                                hf_name, hf_to_mlx, read_config, read_weights)
from qwen35_mlx.models.model import Model

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def lazy_model(directory: Path, *, dtype: str | None = None) -> Model:
    """`load_model(directory, dtype=dtype)` without reading any tensor data."""
    config = read_config(directory)
    weights, origin, is_mlx = read_weights(directory)
    if not is_mlx:
        renamed = {k: hf_name(k, config) for k in weights}
        weights = {new: hf_to_mlx(new, weights[old]) for old, new in renamed.items() if new}
        origin = {new: origin[old] for old, new in renamed.items() if new}
    pending = {k: weights.pop(k) for k in list(weights) if k.startswith(PENDING_PREFIXES)}
    if config.vision is not None and not any(k.startswith(VISION_PREFIX) for k in weights):
        config = dataclasses.replace(config, vision=None)  # a text-only conversion
    model = Model(config)
    quantization = config.raw.get("quantization")
    if quantization:
        _quantize_as_stored(model, weights, quantization)
    _check_weights(model, weights, origin, directory)
    target_dtype = _dtype(dtype, config)
    model.load_weights(list(_cast(weights, target_dtype).items()), strict=True)
    model.set_pending_weights(_cast(pending, target_dtype))
    return model


def _quantize_as_stored(model: Model, weights: dict, quantization: dict) -> None:
    """Quantized modules where the checkpoint stores scales, with per-layer overrides."""
    def stored(path: str, _) -> bool | dict:
        if f"{path}.scales" not in weights:
            return False
        params = quantization.get(path)
        return dict(params) if isinstance(params, dict) else True  # a copy: mlx edits it

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=stored)


def dequantize_modules(model: nn.Module) -> None:
    """Replaces every quantized Linear and Embedding by a float one holding its dequantized
    weight (lazily; the dtype is that of the scales)."""
    floats = [(path, _float_module(module)) for path, module in model.named_modules()
              if isinstance(module, QUANTIZED)]
    model.update_modules(tree_unflatten(floats))


def _float_module(module: nn.Module) -> nn.Module:
    weight = mx.dequantize(module.weight, module.scales, module.biases,
                           group_size=module.group_size, bits=module.bits, mode=module.mode)
    if isinstance(module, nn.QuantizedEmbedding):
        floating = nn.Embedding(*weight.shape)  # [vocabulary, dims]
    else:
        floating = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            floating.bias = module.bias
    floating.weight = weight  # replaces the random initial weight, never evaluated
    return floating
