"""A conversation's state in a model: every layer's cache, the tokens they hold and the M-RoPE
shift of the images among them; snapshots of it that can be restored (docs/ARCHITECTURE.md §7).

A snapshot copies nothing: DeltaNet states are arrays the layers replace rather than write
into, and attention keys and values stay in their shared buffer, trimmed by offset (a cache
restored from a snapshot copies its buffer before its first write). Snapshots are
immutable and belong to one model: restoring one into another model's cache is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import make_layer_caches


@dataclass(frozen=True)
class Snapshot:
    """A `PromptCache` at a token boundary."""

    fingerprint: str  # the model's identity (config and weights)
    layers: tuple  # each layer cache's own snapshot
    tokens: tuple[int, ...]  # the token ids held
    keys: tuple[int, ...]  # the ids as prefix-cache keys (images by their content)
    rope_delta: int  # M-RoPE position shift of the images and videos held
    nbytes: int  # the state it holds (KV counted up to its offset; buffers are shared)

    @property
    def offset(self) -> int:
        return len(self.tokens)


class PromptCache:
    """One cache per decoder layer (what the model's `cache=` takes, indexable per layer), the
    token ids fed through them, their prefix-cache keys and the M-RoPE shift `rope_delta`.

    `generate_step` keeps `tokens`, `keys` and `rope_delta` up to date; a caller who runs the
    model on it directly owns them.
    """

    def __init__(self, layers: list, fingerprint: str):
        self.layers = layers
        self.fingerprint = fingerprint
        self.tokens: list[int] = []
        self.keys: list[int] = []
        self.rope_delta = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, index: int):
        return self.layers[index]

    @property
    def offset(self) -> int:
        """Tokens held."""
        return len(self.tokens)

    @property
    def state(self) -> list:
        """The arrays to evaluate to materialise the cache."""
        return [layer.state for layer in self.layers]

    def append(self, tokens: list[int], keys: list[int] | None = None) -> None:
        """Record tokens just fed through the layers (`keys`: their prefix-cache keys)."""
        self.tokens.extend(tokens)
        self.keys.extend(tokens if keys is None else keys)

    def record_steps(self, on: bool) -> None:
        """Whether the DeltaNet layers keep every token's state of their next calls, so that
        `drop_last` can roll back within a call; off frees what they kept."""
        for layer in self.layers:
            if hasattr(layer, "keep_steps"):
                layer.keep_steps, layer.steps = on, None

    def drop_last(self, count: int) -> None:
        """Forget the last `count` (fewer than all) tokens of the last model call, which ran
        with `record_steps(True)`. `tokens` and `keys` are the caller's to keep."""
        for layer in self.layers:
            layer.drop_last(count)

    def snapshot(self) -> Snapshot:
        """The cache as it is now."""
        layers = tuple(layer.snapshot() for layer in self.layers)
        nbytes = sum(layer.nbytes(self.offset) for layer in self.layers)
        return Snapshot(
            self.fingerprint, layers, tuple(self.tokens), tuple(self.keys), self.rope_delta, nbytes
        )

    def restore(self, snapshot: Snapshot, owned: bool = False) -> None:
        """Roll the cache to `snapshot` (taken from a cache of this model). `owned`: the
        snapshot is this cache's own, unheld one (a rollback), so its buffers stay writable."""
        if snapshot.fingerprint != self.fingerprint:
            raise ValueError(
                "this snapshot was taken from another model (or another "
                "checkpoint or config); restore it into a cache of the model "
                "that made it"
            )
        for layer, state in zip(self.layers, snapshot.layers, strict=True):
            layer.restore(state, owned)
        self.tokens, self.keys = list(snapshot.tokens), list(snapshot.keys)
        self.rope_delta = snapshot.rope_delta


def make_prompt_cache(
    config,
    fingerprint: str,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> PromptCache:
    layers = make_layer_caches(config, kv_bits, kv_group_size, quantized_kv_start)
    if kv_bits is not None:  # a quantized cache's snapshots are for quantized caches alike
        fingerprint += f"/kv{kv_bits}g{kv_group_size}s{quantized_kv_start}"
    return PromptCache(layers, fingerprint)
