"""Counts the MLX primitives (graph nodes) a computation records, on any machine.

The function is traced under `mx.export_function`, which records the graph without running it,
so a path that calls Metal kernels is counted on Linux too; `mx.export_to_dot` of the traced
outputs draws every primitive as one rectangle.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx


def _rectangles(dot: Path) -> Counter:
    # only primitives are drawn as rectangles (arrays are plain nodes), whatever their label
    return Counter(re.findall(r'label ="([^"]*)", shape=rectangle', dot.read_text()))


def graph_counts(*outputs: mx.array) -> Counter:
    """Primitives by name in the graph of `outputs` drawn as it stands (unevaluated arrays, or
    arrays being traced); evaluated arrays and trace inputs are leaves."""
    with tempfile.TemporaryDirectory() as folder:
        dot = Path(folder) / "graph.dot"
        mx.export_to_dot(str(dot), *outputs)
        return _rectangles(dot)


def primitive_counts(fn, *args: mx.array) -> Counter:
    """Primitives by name in the graph of `fn(*args)` (a tuple of arrays), inputs and constants
    excluded."""
    with tempfile.TemporaryDirectory() as folder:
        dot = Path(folder) / "graph.dot"

        def traced(*inputs):
            outputs = tuple(fn(*inputs))
            mx.export_to_dot(str(dot), *outputs)
            return outputs

        try:
            mx.export_function(str(Path(folder) / "traced.mlxfn"), traced, *args)
        except ValueError:
            # writing the trace fails for a few primitives (e.g. Contiguous); it is drawn by then
            if not dot.exists():
                raise
        return _rectangles(dot)


def decode_primitives(layer, decode_path: str, batch: int = 1) -> int:
    """Primitives one decoded token costs a `GatedDeltaNet` layer (projections included) on
    `decode_path` ("fused": the Metal decode step; "plain": the layer's ops)."""
    return sum(decode_primitive_counts(layer, decode_path, batch).values())


def decode_primitive_counts(layer, decode_path: str, batch: int = 1) -> Counter:
    """`decode_primitives` by primitive name."""
    mx.eval(layer.parameters())  # else unevaluated initialisers count too
    channels, kernel = layer.conv1d.weight.shape[:2]
    dtype = layer.conv1d.weight.dtype  # the activation dtype (never quantized)
    x = mx.zeros((batch, 1, layer.out_proj.weight.shape[0]), dtype=dtype)
    conv_state = mx.zeros((batch, kernel - 1, channels), dtype=dtype)
    state = mx.zeros((batch, layer.Hv, layer.Dv, layer.Dk), dtype=mx.float32)

    def step(x, conv_state, state):
        cache = [conv_state, state]
        out = layer(x, cache)
        return out, cache[0], cache[1]

    forced, layer.decode_path = layer.decode_path, decode_path
    try:
        return primitive_counts(step, x, conv_state, state)
    finally:
        layer.decode_path = forced
