"""Cached prompt prefixes: snapshots of a model's cache looked up by the tokens they hold.

A DeltaNet state cannot be trimmed like a KV cache, so a prefix is reusable only where a
snapshot was taken: at the start of each chat message (where a re-rendered history agrees with
the last one), every `interval` tokens, at the end of a prompt (and one token before it) and
after a reply. A lookup
returns the longest snapshot whose tokens begin the new prompt. Images and videos count by
content: their placeholder tokens carry a hash of the pixels as their key, so two pictures of
one size are not one prefix. Entries are dropped least recently used first once their state
exceeds `max_bytes`; attention keys and values are shared between snapshots of one history,
so the bytes counted are an upper bound.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .models.state import PromptCache, Snapshot

MESSAGE_START = "<|im_start|>"


class PrefixCache:
    """Snapshots of prompt prefixes, shared by any number of calls (and threads).

    Args:
        max_bytes: most state kept (default 2 GiB).
        interval: also snapshot every this many prompt tokens (long documents in one message).
    """

    def __init__(self, max_bytes: int = 2 << 30, interval: int = 4096):
        if max_bytes < 0 or interval < 1:
            raise ValueError(f"max_bytes must be >= 0 and interval >= 1, got {max_bytes} and "
                             f"{interval}")
        self.max_bytes, self.interval = max_bytes, interval
        self._entries: OrderedDict[tuple[str, int, str], Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(snapshot.nbytes for snapshot in self._entries.values())

    def insert(self, snapshot: Snapshot) -> None:
        """Keep `snapshot` (the most recently used), dropping the least recently used ones
        beyond the byte budget."""
        if snapshot.offset == 0:
            return
        key = (snapshot.fingerprint, snapshot.offset,
               prefix_digests(snapshot.fingerprint, snapshot.keys, [snapshot.offset])[0])
        with self._lock:
            self._entries[key] = snapshot
            self._entries.move_to_end(key)
            while self.nbytes > self.max_bytes and self._entries:
                self._entries.popitem(last=False)

    def lookup(self, fingerprint: str, keys: Sequence[int], limit: int) -> Snapshot | None:
        """The snapshot of this model holding the longest prefix of `keys` of at most `limit`
        tokens, or None."""
        with self._lock:
            lengths = sorted({offset for model, offset, _ in self._entries
                              if model == fingerprint and offset <= min(limit, len(keys))})
            digests = prefix_digests(fingerprint, keys, lengths)
            for length, digest in reversed(list(zip(lengths, digests))):
                snapshot = self._entries.get((fingerprint, length, digest))
                if snapshot is not None:
                    self._entries.move_to_end((fingerprint, length, digest))
                    return snapshot
        return None

    def restore(self, model, keys: Sequence[int]) -> PromptCache:
        """A new cache of `model` holding the longest cached prefix of `keys` that leaves at
        least one token to feed (the last prompt token's logits are never cached)."""
        cache = model.make_cache()
        snapshot = self.lookup(cache.fingerprint, keys, limit=len(keys) - 1)
        if snapshot is not None:
            cache.restore(snapshot)
        return cache

    def snapshot_points(self, tokenizer, ids: Sequence[int], start: int) -> list[int]:
        """Prompt lengths after `start` to snapshot at: each message start, every `interval`
        tokens, the prompt but its last token (what the same prompt sent again can reuse) and
        the whole prompt."""
        message = tokenizer.encode(MESSAGE_START)
        starts = ([i for i in range(start + 1, len(ids)) if ids[i] == message[0]]
                  if len(message) == 1 else [])
        regular = range((start // self.interval + 1) * self.interval, len(ids), self.interval)
        return sorted(n for n in {*starts, *regular, len(ids) - 1, len(ids)} if n > start)


def prefix_digests(fingerprint: str, keys: Sequence[int], lengths: Sequence[int]) -> list[str]:
    """sha256 of the model and keys[:n] for each n of the increasing `lengths`, in one pass."""
    hasher = hashlib.sha256(fingerprint.encode())
    digests, done = [], 0
    for length in lengths:
        hasher.update(np.asarray(keys[done:length], dtype=np.int64).tobytes())
        digests.append(hasher.copy().hexdigest())
        done = length
    return digests
