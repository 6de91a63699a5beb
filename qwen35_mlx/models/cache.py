"""Generation state: keys and values per full-attention layer, conv and recurrent state per Gated
DeltaNet layer (docs/ARCHITECTURE.md §7).

A model's cache is a list with one entry per decoder layer, from `Model.make_cache()`:
- `KVCache`: keys and values [B, Hkv, T, D] of the tokens seen so far, in buffers grown a block
  of `step` tokens at a time so that decoding does not reallocate every token;
- `QuantizedKVCache` (`make_cache(kv_bits=...)`): the same, held as a `KVCache` until it has
  `quantized_kv_start` tokens, then `mx.quantize`d ((packed, scales, biases) per buffer);
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
            new_keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_values[..., : self.offset, :] = self.values[..., : self.offset, :]
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


KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


class QuantizedKVCache:
    """Keys and values of one full-attention layer, quantized per `group_size` values of a row.

    Float (a `KVCache`) while it holds fewer than `start` tokens; the update that finds
    `start` tokens held quantizes them and from then on every new token (mlx-lm's
    `quantized_kv_start`). `quantization` tells attention which form `update_and_fetch`
    returned: None (float arrays) or (group_size, bits) (tuples of packed, scales, biases).
    Memory per token and layer: 2 * Hkv * (D * bits / 8 + 2 * D / group_size * scale bytes),
    scales and biases in the keys' dtype.
    """

    step = KVCache.step

    def __init__(self, group_size: int = 64, bits: int = 8, start: int = 0):
        check_quantization(bits, group_size, start)
        self.group_size, self.bits, self.start = group_size, bits, start
        self.float_cache: KVCache | None = KVCache()  # None once quantized
        self.keys: tuple[mx.array, ...] | None = None  # packed [B, Hkv, capacity, D*bits/32],
        self.values: tuple[mx.array, ...] | None = None  # scales, biases [.., D/group_size]
        self.offset = 0

    @property
    def quantization(self) -> tuple[int, int] | None:
        return None if self.float_cache is not None else (self.group_size, self.bits)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append keys and values [B, Hkv, T, D]; returns all held so far, float arrays or
        quantized tuples (see `quantization`)."""
        if self.float_cache is not None and self.offset >= self.start:
            self._quantize_held()
        if self.float_cache is not None:
            out = self.float_cache.update_and_fetch(keys, values)
            self.offset = self.float_cache.offset
            return out
        start, end = self.offset, self.offset + keys.shape[2]
        new_keys, new_values = self._quantize(keys), self._quantize(values)
        if self.keys is None or end > self.keys[0].shape[2]:
            self.keys = _grow(self.keys, new_keys, start, end, self.step)
            self.values = _grow(self.values, new_values, start, end, self.step)
        for held, new in zip((*self.keys, *self.values), (*new_keys, *new_values), strict=True):
            held[..., start:end, :] = new
        self.offset = end
        return (
            tuple(a[..., :end, :] for a in self.keys),
            tuple(a[..., :end, :] for a in self.values),
        )

    def _quantize(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _quantize_held(self) -> None:
        held = self.float_cache
        self.float_cache = None
        if held.offset:
            self.keys = self._quantize(held.keys[..., : held.offset, :])
            self.values = self._quantize(held.values[..., : held.offset, :])

    @property
    def state(self) -> list[mx.array]:
        if self.float_cache is not None:
            return self.float_cache.state
        return [] if self.keys is None else [*self.keys, *self.values]


def _grow(held: tuple | None, new: tuple, start: int, needed: int, step: int) -> tuple:
    """Buffers like `new` (each [B, Hkv, T, width]) with room for `needed` tokens, rounded up
    to `step`, holding the first `start` tokens of `held`."""
    capacity = -(-needed // step) * step
    grown = []
    for i, like in enumerate(new):
        buffer = mx.zeros((*like.shape[:2], capacity, like.shape[3]), like.dtype)
        if held is not None:
            buffer[..., :start, :] = held[i][..., :start, :]
        grown.append(buffer)
    return tuple(grown)


def check_quantization(bits: int, group_size: int, start: int, head_dim: int | None = None):
    if bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {KV_BITS}, got {bits!r}")
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {KV_GROUP_SIZES}, got {group_size!r}")
    if head_dim is not None and head_dim % group_size:
        raise ValueError(f"kv_group_size {group_size} does not divide head_dim {head_dim}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"quantized_kv_start must be an integer >= 0, got {start!r}")


def make_cache(
    config: TextConfig,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> list:
    """One cache per layer; kv_bits 4 or 8 quantizes the attention layers' keys and values
    (groups of kv_group_size values) once they hold quantized_kv_start tokens."""
    if kv_bits is None:
        return [DeltaNetCache() if t == LINEAR else KVCache() for t in config.layer_types]
    check_quantization(kv_bits, kv_group_size, quantized_kv_start, config.head_dim)
    return [
        DeltaNetCache()
        if t == LINEAR
        else QuantizedKVCache(kv_group_size, kv_bits, quantized_kv_start)
        for t in config.layer_types
    ]


def cache_offset(cache: list) -> int:
    """Tokens already processed into `cache` (read off its attention layers)."""
    return next((c.offset for c in cache if hasattr(c, "offset")), 0)
