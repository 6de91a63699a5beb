"""One spec object per Metal kernel, read both by MLX and by the MSL-on-CPU emulator in tests/.

A `KernelSpec` names the kernel, its buffers and its `.metal` body (a file beside this one, shape
comment on every pointer); a `Launch` holds what one call needs (template constants, grid,
threadgroup, outputs). `KernelSpec.run` hands both to `mx.fast.metal_kernel`; the emulator asks MLX
for the exact source it would compile for the same pair and runs that on the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

KERNEL_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Launch:
    """Everything one kernel call needs besides its inputs."""

    template: tuple[tuple[str, Any], ...]  # (name, mx.Dtype | int | bool) template constants
    grid: tuple[int, int, int]  # threads, as mx.fast.metal_kernel counts them
    threadgroup: tuple[int, int, int]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]

    def kwargs(self) -> dict:
        """The keyword arguments of a `mx.fast.metal_kernel` call."""
        return dict(
            template=list(self.template),
            grid=self.grid,
            threadgroup=self.threadgroup,
            output_shapes=list(self.output_shapes),
            output_dtypes=list(self.output_dtypes),
        )


@dataclass(frozen=True)
class KernelSpec:
    name: str
    source_file: str  # kernel body, in this folder
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    header_file: str | None = None  # helper functions placed before the kernel, in this folder
    ensure_row_contiguous: bool = True

    @property
    def source(self) -> str:
        return _read(self.source_file)

    @property
    def header(self) -> str:
        return _read(self.header_file) if self.header_file else ""

    def build(self):
        """The `mx.fast.metal_kernel` object (built once per spec)."""
        return _build(self)

    def run(self, inputs: list[mx.array], launch: Launch, verbose: bool = False) -> list[mx.array]:
        return self.build()(inputs=inputs, **launch.kwargs(), verbose=verbose)


@functools.cache
def _read(file_name: str) -> str:
    return (KERNEL_DIR / file_name).read_text()


@functools.cache
def _build(spec: KernelSpec):
    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=spec.header,
        ensure_row_contiguous=spec.ensure_row_contiguous,
    )
