"""Generation state: keys and values per full-attention layer, conv and recurrent state per Gated
DeltaNet layer (docs/ARCHITECTURE.md §7).

A model's cache is a list with one entry per decoder layer, from `Model.make_cache()`:
- `KVCache`: keys and values [B, Hkv, T, D] of the tokens seen so far, in buffers grown a block
  of `step` tokens at a time so that decoding does not reallocate every token;
- `DeltaNetCache`: [0] conv state [B, K-1, conv_dim] (the last K-1 projected inputs, activation
  dtype) and [1] recurrent state [B, Hv, Dv, Dk] (float32 even for bf16 models, as
  transformers keeps it).
Written here rather than taken from mlx-lm, whose modules import transformers at start-up.
"""

from __future__ import annotations

import mlx.core as mx

from .config import LINEAR, TextConfig


class KVCache:
    """Keys and values of one full-attention layer."""

    step = 256  # tokens per buffer block

    def __init__(self):
        self.keys: mx.array | None = None  # [B, Hkv, capacity, D]
        self.values: mx.array | None = None
        self.offset = 0  # tokens held

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys and values [B, Hkv, T, D]; returns all held so far [B, Hkv, offset+T, D]."""
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        blocks = -(-needed // self.step)
        B, H, _, _ = keys.shape
        new_keys = mx.zeros((B, H, blocks * self.step, keys.shape[3]), keys.dtype)
        new_values = mx.zeros((B, H, blocks * self.step, values.shape[3]), values.dtype)
        if self.keys is not None:
            new_keys[..., :self.offset, :] = self.keys[..., :self.offset, :]
            new_values[..., :self.offset, :] = self.values[..., :self.offset, :]
        self.keys, self.values = new_keys, new_values

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate to materialise the cache."""
        return [] if self.keys is None else [self.keys, self.values]


class DeltaNetCache:
    """Conv state ([0]) and recurrent state ([1]) of one Gated DeltaNet layer; None until the
    layer has run."""

    def __init__(self):
        self.arrays: list[mx.array | None] = [None, None]

    def __getitem__(self, index: int) -> mx.array | None:
        return self.arrays[index]

    def __setitem__(self, index: int, value: mx.array) -> None:
        self.arrays[index] = value

    @property
    def state(self) -> list[mx.array]:
        return [array for array in self.arrays if array is not None]


def make_cache(config: TextConfig) -> list:
    return [DeltaNetCache() if t == LINEAR else KVCache() for t in config.layer_types]


def cache_offset(cache: list) -> int:
    """Tokens already processed into `cache` (read off its attention layers)."""
    return next((c.offset for c in cache if hasattr(c, "offset")), 0)
