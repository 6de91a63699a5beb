"""Kernel inputs as the emulator holds them: their MLX dtype and their bytes in numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import EmulatorError

# How each MLX dtype is stored in numpy (numpy has no bfloat16: its bits as uint16).
STORAGE = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,
    mx.int32: np.int32,
    mx.uint32: np.uint32,
    mx.int64: np.int64,
    mx.bool_: np.bool_,
}
FROM_NUMPY = {np.dtype(v): k for k, v in STORAGE.items() if k != mx.bfloat16}


class KernelInput:
    """An input as its MLX dtype and its bytes."""

    def __init__(self, value, name: str):
        if isinstance(value, mx.array):
            self.dtype = value.dtype
            if self.dtype not in STORAGE:
                raise EmulatorError(f"input '{name}': dtype {value.dtype} is not supported")
            storage = value.view(mx.uint16) if value.dtype == mx.bfloat16 else value
            self.data = np.asarray(np.asarray(storage), order="C")
        else:
            if isinstance(value, (bool, int, float)):  # Python scalars as MLX passes them
                value = np.array(
                    value, {bool: np.bool_, int: np.int32, float: np.float32}[type(value)]
                )
            array = np.asarray(value, order="C")  # keeps 0-d arrays 0-d
            if array.dtype not in FROM_NUMPY:
                raise EmulatorError(
                    f"input '{name}': numpy dtype {array.dtype} is not supported; "
                    "pass bfloat16 data as an mx.array"
                )
            self.dtype, self.data = FROM_NUMPY[array.dtype], array

    @property
    def example(self) -> mx.array:
        return mx.zeros(self.data.shape, self.dtype)
