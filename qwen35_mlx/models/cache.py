"""Generation state: keys and values per full-attention layer, conv and recurrent state per Gated
DeltaNet layer (docs/ARCHITECTURE.md §7).

A model's cache holds one of these per decoder layer (`state.PromptCache`, from
`Model.make_cache()`):
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

from dataclasses import dataclass

import mlx.core as mx

from .config import LINEAR, TextConfig


class KVBuffer:
    """Keys and values [B, Hkv, capacity, D] shared by a cache and its snapshots.

    A cache writes only past its offset, so the positions a snapshot holds are never written
    again by the cache that took it; a cache restored from a snapshot copies the buffer before
    its first write (copy on write). Growing the buffer replaces the arrays here, for every
    holder at once, so that snapshots taken along one history share one buffer instead of
    keeping one each.
    """

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


@dataclass(frozen=True)
class KVSnapshot:
    """A `KVCache` at `offset` tokens: the buffer it shares, trimmed by offset."""

    buffer: KVBuffer | None
    offset: int

    def arrays(self) -> dict[str, mx.array]:
        """What a file stores: keys and values [B, Hkv, offset, D]."""
        if self.buffer is None:
            return {}
        return {
            "keys": self.buffer.keys[..., : self.offset, :],
            "values": self.buffer.values[..., : self.offset, :],
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, mx.array], tokens: int) -> KVSnapshot:
        """The snapshot `arrays()` gave, for `tokens` tokens; ValueError if they disagree."""
        keys, values = arrays.get("keys"), arrays.get("values")
        if keys is None or values is None:
            if tokens:
                raise ValueError("no keys and values")
            return cls(None, 0)
        if keys.ndim != 4 or keys.shape[2] != tokens or values.shape[:3] != keys.shape[:3]:
            raise ValueError(f"keys {keys.shape} and values {values.shape} for {tokens} tokens")
        return cls(KVBuffer(keys, values), tokens)


class KVCache:
    """Keys and values of one full-attention layer."""

    step = 256  # tokens per buffer block

    def __init__(self):
        self.buffer: KVBuffer | None = None
        self.offset = 0  # tokens held
        self.owned = True  # False after a restore: another cache may write into the buffer

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys and values [B, Hkv, T, D]; returns all held so far [B, Hkv, offset+T, D]."""
        start, end = self.offset, self.offset + keys.shape[2]
        if self.buffer is None or not self.owned:
            self.buffer, self.owned = self._copy(keys, values, end), True
        elif end > self.buffer.capacity:
            fresh = self._copy(keys, values, end)
            self.buffer.keys, self.buffer.values = fresh.keys, fresh.values
        self.buffer.keys[..., start:end, :] = keys
        self.buffer.values[..., start:end, :] = values
        self.offset = end
        return self.buffer.keys[..., :end, :], self.buffer.values[..., :end, :]

    def _copy(self, keys: mx.array, values: mx.array, needed: int) -> KVBuffer:
        """A new buffer with room for `needed` tokens holding the first `offset` ones."""
        capacity = -(-needed // self.step) * self.step
        B, H, _, _ = keys.shape
        buffer = KVBuffer(
            mx.zeros((B, H, capacity, keys.shape[3]), keys.dtype),
            mx.zeros((B, H, capacity, values.shape[3]), values.dtype),
        )
        if self.buffer is not None and self.offset:
            buffer.keys[..., : self.offset, :] = self.buffer.keys[..., : self.offset, :]
            buffer.values[..., : self.offset, :] = self.buffer.values[..., : self.offset, :]
        return buffer

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate to materialise the cache."""
        return [] if self.buffer is None else [self.buffer.keys, self.buffer.values]

    def snapshot(self) -> KVSnapshot:
        return KVSnapshot(self.buffer, self.offset)

    def drop_last(self, count: int) -> None:
        """Forget the last `count` tokens (later writes go over them)."""
        self.offset -= count

    def restore(self, snapshot: KVSnapshot, owned: bool = False) -> None:
        """Back to `snapshot`; unless `owned` (this cache's own rollback), the buffer is copied
        before the next write, as another cache may continue from the same snapshot."""
        self.buffer, self.offset = snapshot.buffer, snapshot.offset
        self.owned = owned

    def snapshot_from_arrays(self, arrays: dict[str, mx.array], tokens: int) -> KVSnapshot:
        return KVSnapshot.from_arrays(arrays, tokens)

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes of the keys and values of the first `tokens` (default: all held)."""
        if self.buffer is None:
            return 0
        per_token = (self.buffer.keys.nbytes + self.buffer.values.nbytes) // self.buffer.capacity
        return per_token * (self.offset if tokens is None else tokens)


@dataclass(frozen=True)
class DeltaNetSnapshot:
    """A `DeltaNetCache`'s arrays (the layer replaces them, so holding them copies nothing)."""

    conv: mx.array | None
    recurrent: mx.array | None

    def arrays(self) -> dict[str, mx.array]:
        return {
            name: array
            for name, array in (("conv", self.conv), ("recurrent", self.recurrent))
            if array is not None
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, mx.array], tokens: int) -> DeltaNetSnapshot:
        conv, recurrent = arrays.get("conv"), arrays.get("recurrent")
        if tokens and (conv is None or recurrent is None):
            raise ValueError("no DeltaNet state")
        return cls(conv, recurrent)


class DeltaNetCache:
    """Conv state ([0]) and recurrent state ([1]) of one Gated DeltaNet layer; None until the
    layer has run."""

    def __init__(self):
        self.arrays: list[mx.array | None] = [None, None]
        self.keep_steps = False  # the layer records `steps` on each call (speculative decoding)
        self.steps: tuple[mx.array, mx.array] | None = None  # conv inputs, per-token states

    def __getitem__(self, index: int) -> mx.array | None:
        return self.arrays[index]

    def __setitem__(self, index: int, value: mx.array) -> None:
        self.arrays[index] = value  # the layer assigns new arrays: a snapshot keeps the old

    @property
    def state(self) -> list[mx.array]:
        return [array for array in self.arrays if array is not None]

    def snapshot(self) -> DeltaNetSnapshot:
        return DeltaNetSnapshot(*self.arrays)

    def drop_last(self, count: int) -> None:
        """Back to the state after the last call's first T - count tokens (it ran with
        `keep_steps`): the conv inputs [B, K-1+T, C] and states [B, T, Hv, Dv, Dk] it kept."""
        padded, states = self.steps
        kept = states.shape[1] - count
        window = padded.shape[1] - states.shape[1]  # K - 1
        # copies: views would keep every token's state alive
        self.arrays = [
            mx.contiguous(padded[:, kept : kept + window]),
            mx.contiguous(states[:, kept - 1]),
        ]

    def restore(self, snapshot: DeltaNetSnapshot, owned: bool = False) -> None:
        self.arrays = [snapshot.conv, snapshot.recurrent]

    def snapshot_from_arrays(self, arrays: dict[str, mx.array], tokens: int) -> DeltaNetSnapshot:
        return DeltaNetSnapshot.from_arrays(arrays, tokens)

    def nbytes(self, tokens: int | None = None) -> int:
        return sum(array.nbytes for array in self.state)


class RowKVCaches:
    """One attention layer's caches for a batch of conversations decoded together
    (`batch.BatchGenerator`, docs/ARCHITECTURE.md §10.1): row i's own cache at its own offset,
    its M-RoPE shift `rope_deltas[i]`. The layer runs its projections and rotary over the
    whole batch, the cache update and attention per row."""

    def __init__(self, rows: list, rope_deltas: list[int]):
        self.rows, self.rope_deltas = rows, rope_deltas

    @property
    def positions(self) -> mx.array:
        """[B] int32: each row's position for its next token."""
        return mx.array([row.offset + delta for row, delta in zip(self.rows, self.rope_deltas)])

    @property
    def state(self) -> list[mx.array]:
        return [array for row in self.rows for array in row.state]

    def snapshot(self) -> list:
        return [row.snapshot() for row in self.rows]

    def restore(self, snapshots: list, owned: bool = False) -> None:
        for row, snapshot in zip(self.rows, snapshots, strict=True):
            row.restore(snapshot, owned)


KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantizedKVSnapshot:
    """A `QuantizedKVCache` at `offset` tokens: still float (`float_part`) or its quantized
    (packed, scales, biases) keys and values, trimmed by offset."""

    float_part: KVSnapshot | None
    keys: tuple[mx.array, ...] | None
    values: tuple[mx.array, ...] | None
    offset: int

    def arrays(self) -> dict[str, mx.array]:
        if self.float_part is not None:
            return self.float_part.arrays()
        if self.keys is None:
            return {}
        return {
            f"{kind}.{part}": array[..., : self.offset, :]
            for kind, held in (("keys", self.keys), ("values", self.values))
            for part, array in zip(QUANTIZED_PARTS, held)
        }


QUANTIZED_PARTS = ("packed", "scales", "biases")


class QuantizedKVCache:
    """Keys and values of one full-attention layer, quantized per `group_size` values of a row.

    Float (a `KVCache`) while it holds fewer than `start` tokens; the update that finds
    `start` tokens held quantizes them and from then on every new token (mlx-lm's
    `quantized_kv_start`). `quantization` tells attention which form `update_and_fetch`
    returned: None (float arrays) or (group_size, bits) (tuples of packed, scales, biases).
    Memory per token and layer: 2 * Hkv * (D * bits / 8 + 2 * D / group_size * scale bytes),
    scales and biases in the keys' dtype. Snapshots share the buffers as `KVCache`'s do; a
    restored cache copies them before its first write.
    """

    step = KVCache.step

    def __init__(self, group_size: int = 64, bits: int = 8, start: int = 0):
        check_quantization(bits, group_size, start)
        self.group_size, self.bits, self.start = group_size, bits, start
        self.float_cache: KVCache | None = KVCache()  # None once quantized
        self.keys: tuple[mx.array, ...] | None = None  # packed [B, Hkv, capacity, D*bits/32],
        self.values: tuple[mx.array, ...] | None = None  # scales, biases [.., D/group_size]
        self.offset = 0
        self.owned = True  # False after a restore: another cache may write into the buffers

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
        if self.keys is None or not self.owned or end > self.keys[0].shape[2]:
            self.keys = _grow(self.keys, new_keys, start, end, self.step)
            self.values = _grow(self.values, new_values, start, end, self.step)
            self.owned = True
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
        held, self.float_cache = self.float_cache, None
        if held.offset:
            keys, values = (array[..., : held.offset, :] for array in held.state)
            self.keys, self.values = self._quantize(keys), self._quantize(values)
            self.owned = True

    @property
    def state(self) -> list[mx.array]:
        if self.float_cache is not None:
            return self.float_cache.state
        return [] if self.keys is None else [*self.keys, *self.values]

    def drop_last(self, count: int) -> None:
        """Forget the last `count` tokens (later writes go over them)."""
        if self.float_cache is not None:
            self.float_cache.drop_last(count)
        self.offset -= count

    def snapshot(self) -> QuantizedKVSnapshot:
        if self.float_cache is not None:
            return QuantizedKVSnapshot(self.float_cache.snapshot(), None, None, self.offset)
        return QuantizedKVSnapshot(None, self.keys, self.values, self.offset)

    def restore(self, snapshot: QuantizedKVSnapshot, owned: bool = False) -> None:
        if snapshot.float_part is not None:
            self.float_cache = KVCache()
            self.float_cache.restore(snapshot.float_part, owned)
        else:
            self.float_cache = None
        self.keys, self.values, self.offset = snapshot.keys, snapshot.values, snapshot.offset
        self.owned = owned

    def nbytes(self, tokens: int | None = None) -> int:
        tokens = self.offset if tokens is None else tokens
        if self.float_cache is not None:
            return self.float_cache.nbytes(tokens)
        if self.keys is None:
            return 0
        per_token = sum(a.nbytes for a in (*self.keys, *self.values)) // self.keys[0].shape[2]
        return per_token * tokens

    def snapshot_from_arrays(self, arrays: dict[str, mx.array], tokens: int) -> QuantizedKVSnapshot:
        if "keys" in arrays or not arrays:
            return QuantizedKVSnapshot(KVSnapshot.from_arrays(arrays, tokens), None, None, tokens)
        try:
            keys, values = (
                tuple(arrays[f"{kind}.{part}"] for part in QUANTIZED_PARTS)
                for kind in ("keys", "values")
            )
        except KeyError as missing:
            raise ValueError(f"no quantized {missing.args[0]}") from None
        if any(a.ndim != 4 or a.shape[2] != tokens for a in (*keys, *values)):
            raise ValueError(f"quantized keys and values for other than {tokens} tokens")
        if keys[0].shape[-1] * 32 // self.bits != keys[1].shape[-1] * self.group_size:
            raise ValueError(
                f"keys quantized otherwise than {self.bits} bits in groups of "
                f"{self.group_size}; use the kv_bits the state was saved with"
            )
        return QuantizedKVSnapshot(None, keys, values, tokens)


def _grow(held: tuple | None, new: tuple, start: int, needed: int, step: int) -> tuple:
    """New buffers like `new` (each [B, Hkv, T, width]) with room for `needed` tokens, rounded
    up to `step`, holding the first `start` tokens of `held`."""
    capacity = -(-needed // step) * step
    grown = []
    for i, like in enumerate(new):
        buffer = mx.zeros((*like.shape[:2], capacity, like.shape[3]), like.dtype)
        if held is not None and start:
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
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"quantized_kv_start must be an integer >= 0, got {start!r}")


def make_layer_caches(
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
