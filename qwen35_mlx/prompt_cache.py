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

import array
import hashlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx

from .models.state import PromptCache, Snapshot

MESSAGE_START = "<|im_start|>"


class PrefixCache:
    """Snapshots of prompt prefixes, shared by any number of calls (and threads).

    Args:
        max_bytes: most state kept in memory (default 2 GiB).
        interval: also snapshot every this many prompt tokens (long documents in one message).
        directory: a folder that also keeps every snapshot on disk, so that a later run
            resumes a long conversation at once. Files are keyed by the model's fingerprint and
            a hash of the tokens, written atomically; one that is corrupt or not a prompt cache
            is skipped with a warning and removed. A folder that cannot be written is skipped
            with a warning (generation goes on without it).
    """

    def __init__(
        self, max_bytes: int = 2 << 30, interval: int = 4096, directory: str | Path | None = None
    ):
        if max_bytes < 0 or interval < 1:
            raise ValueError(
                f"max_bytes must be >= 0 and interval >= 1, got {max_bytes} and {interval}"
            )
        self.max_bytes, self.interval = max_bytes, interval
        self.directory = None if directory is None else _usable_folder(Path(directory))
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
        key = (
            snapshot.fingerprint,
            snapshot.offset,
            prefix_digests(snapshot.fingerprint, snapshot.keys, [snapshot.offset])[0],
        )
        if self.directory is not None:
            self._write(key, snapshot)
        with self._lock:
            self._entries[key] = snapshot
            self._entries.move_to_end(key)
            while self.nbytes > self.max_bytes and self._entries:
                self._entries.popitem(last=False)

    def lookup(self, fingerprint: str, keys: Sequence[int], limit: int) -> Snapshot | None:
        """The snapshot of this model holding the longest prefix of `keys` of at most `limit`
        tokens, or None."""
        with self._lock:
            lengths = sorted(
                {
                    offset
                    for model, offset, _ in self._entries
                    if model == fingerprint and offset <= min(limit, len(keys))
                }
            )
            digests = prefix_digests(fingerprint, keys, lengths)
            for length, digest in reversed(list(zip(lengths, digests))):
                snapshot = self._entries.get((fingerprint, length, digest))
                if snapshot is not None:
                    self._entries.move_to_end((fingerprint, length, digest))
                    return snapshot
        return None

    def restore(self, model, keys: Sequence[int], **cache_kwargs) -> PromptCache:
        """A new cache of `model` (`model.make_cache(**cache_kwargs)`) holding the longest
        cached prefix of `keys` that leaves at least one token to feed (the last prompt
        token's logits are never cached)."""
        cache = model.make_cache(**cache_kwargs)
        snapshot = self.lookup(cache.fingerprint, keys, limit=len(keys) - 1)
        if self.directory is not None:
            stored = self._read_longer(
                cache, keys, len(keys) - 1, 0 if snapshot is None else snapshot.offset
            )
            snapshot = stored or snapshot
        if snapshot is not None:
            cache.restore(snapshot)
        return cache

    def _file(self, key: tuple[str, int, str]) -> Path:
        fingerprint, offset, digest = key
        return self.directory / f"{fingerprint[:16]}-{offset}-{digest[:32]}.safetensors"

    def _write(self, key: tuple[str, int, str], snapshot: Snapshot) -> None:
        file = self._file(key)
        if file.exists():
            return
        try:
            save_prompt_cache(file, snapshot)
        except (OSError, RuntimeError) as error:  # full disk, permissions: go on without it
            warnings.warn(
                f"prompt cache folder {self.directory}: cannot write {file.name} "
                f"({error}); the disk tier is off for this run",
                stacklevel=2,
            )
            self.directory = None

    def _read_longer(
        self, cache: PromptCache, keys: Sequence[int], limit: int, shorter: int
    ) -> Snapshot | None:
        """The longest snapshot on disk for `keys` longer than `shorter` tokens, if any."""
        fingerprint = cache.fingerprint
        stored = {}
        for file in self.directory.glob(f"{fingerprint[:16]}-*-*.safetensors"):
            _, offset, digest = file.stem.split("-")
            if offset.isdigit() and shorter < int(offset) <= min(limit, len(keys)):
                stored[(int(offset), digest)] = file
        lengths = sorted({offset for offset, _ in stored})
        for length, digest in reversed(
            list(zip(lengths, prefix_digests(fingerprint, keys, lengths)))
        ):
            file = stored.get((length, digest[:32]))
            if file is None:
                continue
            try:
                snapshot = read_snapshot(file, cache)
            except ValueError as error:
                warnings.warn(
                    f"skipping and removing prompt cache file {file} ({error})", stacklevel=2
                )
                file.unlink(missing_ok=True)
                continue
            if tuple(keys[:length]) == snapshot.keys:
                self.insert(snapshot)
                return snapshot
        return None

    def snapshot_points(self, tokenizer, ids: Sequence[int], start: int) -> list[int]:
        """Prompt lengths after `start` to snapshot at: each message start, every `interval`
        tokens, the prompt but its last token (what the same prompt sent again can reuse) and
        the whole prompt."""
        message = tokenizer.encode(MESSAGE_START)
        starts = (
            [i for i in range(start + 1, len(ids)) if ids[i] == message[0]]
            if len(message) == 1
            else []
        )
        regular = range((start // self.interval + 1) * self.interval, len(ids), self.interval)
        return sorted(n for n in {*starts, *regular, len(ids) - 1, len(ids)} if n > start)


def _usable_folder(directory: Path) -> Path | None:
    """`directory`, created if needed, or None with a warning when it cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        warnings.warn(
            f"prompt cache folder {directory} cannot be written ({error}); going on "
            "without a disk tier",
            stacklevel=3,
        )
        return None
    return directory


def prefix_digests(fingerprint: str, keys: Sequence[int], lengths: Sequence[int]) -> list[str]:
    """sha256 of the model and keys[:n] for each n of the increasing `lengths`, in one pass."""
    hasher = hashlib.sha256(fingerprint.encode())
    digests, done = [], 0
    for length in lengths:
        hasher.update(array.array("q", keys[done:length]).tobytes())
        digests.append(hasher.copy().hexdigest())
        done = length
    return digests


FILE_FORMAT = "qwen35-mlx-prompt-cache"
FILE_VERSION = "1"


def save_prompt_cache(path: str | Path, cache: PromptCache | Snapshot) -> None:
    """Write a conversation's state (a cache or a snapshot) to a safetensors file, atomically
    (a temporary file renamed into place). Only arrays and JSON are stored: nothing in it is
    executed when it is read."""
    snapshot = cache.snapshot() if isinstance(cache, PromptCache) else cache
    arrays = {
        f"{index}.{name}": array
        for index, layer in enumerate(snapshot.layers)
        for name, array in layer.arrays().items()
    }
    metadata = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "fingerprint": snapshot.fingerprint,
        "tokens": json.dumps(snapshot.tokens),
        "keys": json.dumps(snapshot.keys),
        "rope_delta": str(snapshot.rope_delta),
    }
    path = Path(path)
    # MLX adds .safetensors to a name that lacks it
    partial = path.with_name(
        f".{path.stem}.{os.getpid()}.{threading.get_ident()}.partial.safetensors"
    )
    try:
        mx.save_safetensors(str(partial), arrays, metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_prompt_cache(path: str | Path, model, **cache_kwargs) -> PromptCache:
    """A cache of `model` (`model.make_cache(**cache_kwargs)`, e.g. kv_bits=8 for a state
    saved from such a cache) holding the state saved in `path` by `save_prompt_cache`.

    Raises:
        ValueError: the file is not a prompt cache, is truncated or corrupt, or was saved from
            another model (another checkpoint, config or dtype).
    """
    cache = model.make_cache(**cache_kwargs)
    cache.restore(read_snapshot(path, cache))
    return cache


def read_snapshot(path: str | Path, cache: PromptCache) -> Snapshot:
    """The snapshot saved in `path`, checked against `cache`'s model and layers."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as error:  # mlx raises RuntimeError/ValueError for unreadable files
        raise ValueError(
            f"{path} cannot be read as a prompt cache ({error}); it is truncated "
            "or corrupt: delete it"
        ) from None
    if (metadata or {}).get("format") != FILE_FORMAT:
        raise ValueError(
            f"{path} is not a qwen35-mlx prompt cache (saved by save_prompt_cache); point to one"
        )
    if metadata.get("fingerprint") != cache.fingerprint:
        raise ValueError(
            f"{path} was saved from another model (or another checkpoint, config "
            "or dtype); load it with the model that saved it"
        )
    try:
        tokens = tuple(json.loads(metadata["tokens"]))
        keys = tuple(json.loads(metadata["keys"]))
        layers = tuple(
            layer.snapshot_from_arrays(_layer_arrays(arrays, index), len(tokens))
            for index, layer in enumerate(cache.layers)
        )
        rope_delta = int(metadata["rope_delta"])
        unknown = set(arrays) - {
            f"{index}.{name}" for index, layer in enumerate(layers) for name in layer.arrays()
        }
        if len(keys) != len(tokens) or unknown:
            raise ValueError(
                f"{len(keys)} keys for {len(tokens)} tokens, arrays "
                f"{sorted(unknown)[:3]} no layer holds"
            )
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a whole prompt cache ({error}); delete it") from None
    nbytes = sum(array.nbytes for array in arrays.values())
    return Snapshot(cache.fingerprint, layers, tokens, keys, rope_delta, nbytes)


def _layer_arrays(arrays: dict[str, mx.array], index: int) -> dict[str, mx.array]:
    """The arrays a file holds for layer `index`, by their names in its snapshot."""
    prefix = f"{index}."
    return {name[len(prefix) :]: array for name, array in arrays.items() if name.startswith(prefix)}
