"""Weights of a model part (the vision tower, the MTP head) read on first use, not at load.

Such a part holds lazy arrays until then. A lazy array can only be evaluated on the thread
that built it (MLX streams are per thread), and a model serves any thread: first used on
another thread, the part's weights are built again there from the checkpoint files.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn


class DeferredWeights:
    """The pending weights of `module`; `read()` builds them anew (under the module's own
    names) on the thread that calls it."""

    def __init__(self, module: nn.Module, read: Callable[[], Mapping[str, mx.array]]):
        self._module = module
        self._read = read
        self._loading_thread = threading.get_ident()
        self._lock = threading.Lock()

    def materialise(self) -> None:
        """Evaluate the weights, once, on the calling thread."""
        with self._lock:
            if self._read is None:
                return
            if threading.get_ident() != self._loading_thread:
                self._module.load_weights(list(self._read().items()))
            mx.eval(self._module.parameters())
            self._read = None
