"""Generation state: keys and values per full-attention layer, conv and recurrent state per Gated
DeltaNet layer (docs/ARCHITECTURE.md §7).

A model's cache holds one of these per decoder layer (`state.PromptCache`, from
`Model.make_cache()`):
- `KVCache`: keys and values [B, Hkv, T, D] of the tokens seen so far, in buffers grown a block
  of `step` tokens at a time so that decoding does not reallocate every token;
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

    Positions below `shared_upto` are held by a snapshot, so they are never written again: a
    cache that rolls back below it copies the buffer before writing (copy on write). Growing
    the buffer replaces the arrays here, for every holder at once, so that snapshots taken
    along one history share one buffer instead of keeping one each.
    """

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        self.shared_upto = 0

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
        return {"keys": self.buffer.keys[..., :self.offset, :],
                "values": self.buffer.values[..., :self.offset, :]}

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
    Snapshot = KVSnapshot

    def __init__(self):
        self.buffer: KVBuffer | None = None
        self.offset = 0  # tokens held
        self.owned = True  # False after a restore: another cache may write into the buffer

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys and values [B, Hkv, T, D]; returns all held so far [B, Hkv, offset+T, D]."""
        start, end = self.offset, self.offset + keys.shape[2]
        if self.buffer is None or not self.owned or start < self.buffer.shared_upto:
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
        buffer = KVBuffer(mx.zeros((B, H, capacity, keys.shape[3]), keys.dtype),
                          mx.zeros((B, H, capacity, values.shape[3]), values.dtype))
        if self.buffer is not None and self.offset:
            buffer.keys[..., :self.offset, :] = self.buffer.keys[..., :self.offset, :]
            buffer.values[..., :self.offset, :] = self.buffer.values[..., :self.offset, :]
        return buffer

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate to materialise the cache."""
        return [] if self.buffer is None else [self.buffer.keys, self.buffer.values]

    def snapshot(self, hold: bool = True) -> KVSnapshot:
        """The cache now; with `hold`, the positions below offset are never written again."""
        if hold and self.buffer is not None:
            self.buffer.shared_upto = max(self.buffer.shared_upto, self.offset)
        return KVSnapshot(self.buffer, self.offset)

    def restore(self, snapshot: KVSnapshot, owned: bool = False) -> None:
        """Back to `snapshot`; unless `owned` (this cache's own rollback), the buffer is copied
        before the next write, as another cache may continue from the same snapshot."""
        self.buffer, self.offset = snapshot.buffer, snapshot.offset
        self.owned = owned

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
        return {name: array for name, array in (("conv", self.conv),
                                                ("recurrent", self.recurrent))
                if array is not None}

    @classmethod
    def from_arrays(cls, arrays: dict[str, mx.array], tokens: int) -> DeltaNetSnapshot:
        conv, recurrent = arrays.get("conv"), arrays.get("recurrent")
        if tokens and (conv is None or recurrent is None):
            raise ValueError("no DeltaNet state")
        return cls(conv, recurrent)


class DeltaNetCache:
    """Conv state ([0]) and recurrent state ([1]) of one Gated DeltaNet layer; None until the
    layer has run."""

    Snapshot = DeltaNetSnapshot

    def __init__(self):
        self.arrays: list[mx.array | None] = [None, None]

    def __getitem__(self, index: int) -> mx.array | None:
        return self.arrays[index]

    def __setitem__(self, index: int, value: mx.array) -> None:
        self.arrays[index] = value  # the layer assigns new arrays: a snapshot keeps the old

    @property
    def state(self) -> list[mx.array]:
        return [array for array in self.arrays if array is not None]

    def snapshot(self, hold: bool = True) -> DeltaNetSnapshot:
        return DeltaNetSnapshot(*self.arrays)

    def restore(self, snapshot: DeltaNetSnapshot, owned: bool = False) -> None:
        self.arrays = [snapshot.conv, snapshot.recurrent]

    def nbytes(self, tokens: int | None = None) -> int:
        return sum(array.nbytes for array in self.state)


def make_layer_caches(config: TextConfig) -> list:
    return [DeltaNetCache() if t == LINEAR else KVCache() for t in config.layer_types]
