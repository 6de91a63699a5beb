"""emulate(spec, inputs, launch): run a kernel on the CPU in several thread orders and check it."""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import shutil
import subprocess

import mlx.core as mx
import numpy as np

from .arrays import STORAGE, KernelInput
from .build import library
from .counters import BUFFER_FIELDS, HEADER, SITE_FIELDS, LaunchCounters, launch_counters
from .errors import EmulatorError
from .source import generated_source, translate

_C_INTS = {
    "int": np.int32,
    "int32_t": np.int32,
    "int64_t": np.int64,
    "size_t": np.uint64,
    "uint": np.uint32,
    "uint32_t": np.uint32,
}
_ORDER_NAMES = ("forward", "reverse")
ERROR_BYTES = 4096
COUNTER_SITES = 1024  # threadgroup-memory access sites the counters hold (runtime.cpp Counters)


class _Launch(ctypes.Structure):  # mirrors msl::Launch in runtime.cpp
    _fields_ = [
        ("kernel", ctypes.c_char_p),
        ("buffers", ctypes.c_int),
        ("names", ctypes.POINTER(ctypes.c_char_p)),
        ("spaces", ctypes.POINTER(ctypes.c_char_p)),
        ("bytes", ctypes.POINTER(ctypes.c_int64)),
        ("data", ctypes.POINTER(ctypes.c_void_p)),
        ("shadow", ctypes.POINTER(ctypes.c_void_p)),
        ("orders", ctypes.c_int),
        ("grid", ctypes.c_uint32 * 3),
        ("group", ctypes.c_uint32 * 3),
        ("timeout_s", ctypes.c_int),
        ("error", ctypes.c_void_p),
        ("error_size", ctypes.c_int),
        ("counters", ctypes.c_void_p),
        ("counter_slots", ctypes.c_int),
    ]


def emulate(spec, inputs, launch, orders: int = 3) -> list[np.ndarray]:
    """Runs `spec` under `launch` on the CPU and returns its outputs.

    Args:
        spec: a `qwen35_mlx.gated_delta.kernel.KernelSpec`.
        inputs: per name in `spec.input_names`, an np.ndarray, numpy or Python scalar, or
            mx.array (bfloat16 only as mx.array).
        launch: a `qwen35_mlx.gated_delta.kernel.Launch`.
        orders: thread orders to run (forward, reverse, then seeded shuffles); outputs must agree
            bitwise between them.
    Returns:
        One np.ndarray per output with `launch.output_shapes`; bfloat16 outputs come back as the
        exact float32 values.
    Raises:
        EmulatorError: out-of-bounds access, divergent SIMD op or barrier, deadlock, output element
            never written, data race (threadgroup memory or outputs accessed by two threads with
            no barrier or SIMD-group sync ordering them; see runtime.cpp), outputs that depend on
            the thread order, crash, or a build failure.
    """
    outputs, _ = _emulate(spec, inputs, launch, orders, counters=False)
    return outputs


def profile(spec, inputs, launch, orders: int = 1) -> LaunchCounters:
    """Runs `spec` under `launch` as `emulate` does and counts what the launch asks of the
    hardware (counters.LaunchCounters, with the outputs); the counters come from the first
    thread order, which runs both race detectors (their hooks count the accesses)."""
    outputs, (raw, lib, params) = _emulate(spec, inputs, launch, orders, counters=True)
    names = [p.name for p in _buffers(params)]

    def innermost_lines(offsets: list[int]) -> list[str | None]:
        frames = _kernel_frames(spec, lib, [f"{o:x}" for o in offsets])
        return [frame[0] if frame else None for frame in frames]

    return launch_counters(spec, launch, outputs, raw, names, innermost_lines)


def _emulate(spec, inputs, launch, orders, counters: bool):
    if len(inputs) != len(spec.input_names):
        raise EmulatorError(
            f"kernel '{spec.name}' takes {len(spec.input_names)} inputs "
            f"{spec.input_names}, got {len(inputs)}"
        )
    if orders < 1:
        raise EmulatorError("orders must be >= 1")
    _check_launch(spec, launch)
    ins = {n: KernelInput(v, n) for n, v in zip(spec.input_names, inputs)}
    source = generated_source(spec, list(ins.values()), launch)
    translation = translate(spec, source)
    lib = library(translation.cpp, translation.kernel)
    outputs, raw = _run(spec, lib, translation.params, ins, launch, orders, counters)
    return outputs, (raw, lib, translation.params)


def run_on_emulator(spec, inputs, launch, verbose: bool = False) -> list[mx.array]:
    """`KernelSpec.run` with the kernel executed here: outputs as MLX arrays of the launch's
    dtypes. Tests patch it in for `KernelSpec.run` to send a model's kernel calls here."""
    outputs = emulate(spec, inputs, launch)
    return [mx.array(out).astype(dtype) for out, dtype in zip(outputs, launch.output_dtypes)]


def _check_launch(spec, launch) -> None:
    threads = int(np.prod(launch.threadgroup))
    if threads > 1024 or min(launch.threadgroup) < 1 or min(launch.grid) < 1:
        raise EmulatorError(
            f"kernel '{spec.name}': threadgroup {launch.threadgroup} must have "
            f"1..1024 threads and grid {launch.grid} at least one per axis"
        )
    if len(launch.output_shapes) != len(spec.output_names):
        raise EmulatorError(
            f"kernel '{spec.name}': {len(spec.output_names)} outputs "
            f"{spec.output_names} but {len(launch.output_shapes)} output shapes"
        )


def _buffer_bytes(param, ins: dict[str, KernelInput]) -> np.ndarray:
    """The contents of an input buffer, or of MLX's `<input>_shape/_strides/_ndim` buffers."""
    if param.name in ins:
        return ins[param.name].data
    for suffix in ("_shape", "_strides", "_ndim"):
        owner = param.name[: -len(suffix)]
        if param.name.endswith(suffix) and owner in ins:
            shape = ins[owner].data.shape
            kind = _C_INTS[param.element.replace("const", "").strip()]
            if suffix == "_shape":
                return np.array(shape or (0,), kind)
            if suffix == "_ndim":
                return np.array(len(shape), kind)
            strides = np.cumprod((1,) + shape[:0:-1])[::-1] if shape else (0,)
            return np.array(strides, kind)
    raise EmulatorError(f"no data for kernel parameter '{param.name}'")


def _buffers(params) -> list:
    return sorted((p for p in params if p.attribute == "buffer"), key=lambda p: p.index)


def _run(spec, lib, params, ins, launch, orders, counters):
    """The outputs of the first order, and its raw counters (np.int64) when `counters`."""
    buffers = _buffers(params)
    outputs = dict(zip(spec.output_names, zip(launch.output_shapes, launch.output_dtypes)))
    sizes = {
        name: int(np.prod(shape, dtype=np.int64)) * np.dtype(STORAGE[dtype]).itemsize
        for name, (shape, dtype) in outputs.items()
    }
    # Errors, counters, outputs and their write shadows live in memory shared with the forked
    # children.
    slots = HEADER + BUFFER_FIELDS * len(buffers) + SITE_FIELDS * COUNTER_SITES
    counter_bytes = 8 * slots if counters else 0
    shared = mmap.mmap(-1, orders * ERROR_BYTES + counter_bytes + 2 * orders * sum(sizes.values()))
    shared_address = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    offset = orders * ERROR_BYTES + counter_bytes
    data, shadow, views = [], [], {}
    for order in range(orders):
        for p in buffers:
            if p.name in outputs:
                shape, dtype = outputs[p.name]
                size = sizes[p.name]
                array = np.frombuffer(shared, np.uint8, size, offset)
                array[:] = 0xFF - order  # poison: NaN in the first order, other garbage later
                marks = np.frombuffer(shared, np.uint8, size, offset + size)
                views[order, p.name] = (array, marks)
                data.append(shared_address + offset)
                shadow.append(shared_address + offset + size)
                offset += 2 * size
            else:
                contents = _buffer_bytes(p, ins)
                views[order, p.name] = contents
                data.append(contents.ctypes.data)
                shadow.append(None)
    names = [p.name.encode() for p in buffers]
    spaces = [(b"device" if p.name in outputs or p.name in ins else b"constant") for p in buffers]
    nbytes = [sizes[p.name] if p.name in outputs else views[0, p.name].nbytes for p in buffers]
    call = _Launch(
        spec.name.encode(),
        len(buffers),
        (ctypes.c_char_p * len(buffers))(*names),
        (ctypes.c_char_p * len(buffers))(*spaces),
        (ctypes.c_int64 * len(buffers))(*nbytes),
        (ctypes.c_void_p * len(data))(*data),
        (ctypes.c_void_p * len(shadow))(*shadow),
        orders,
        (ctypes.c_uint32 * 3)(*launch.grid),
        (ctypes.c_uint32 * 3)(*launch.threadgroup),
        int(os.environ.get("QWEN35_MLX_EMULATOR_TIMEOUT", "600")),
        shared_address,
        ERROR_BYTES,
        shared_address + orders * ERROR_BYTES if counters else None,
        slots,
    )
    lib.msl_emulate.restype = ctypes.c_int
    status = lib.msl_emulate(ctypes.byref(call))
    if status:
        message = shared[:ERROR_BYTES].split(b"\0", 1)[0].decode(errors="replace")
        if status == 2:
            message = (
                f"kernel '{spec.name}' ran longer than $QWEN35_MLX_EMULATOR_TIMEOUT "
                "seconds (an endless loop?)"
            )
        message, _, frames = message.partition("\n@frames")
        message = re.sub(r"@site:([0-9a-f]+)", lambda m: _site_line(spec, lib, m[1]), message)
        raise EmulatorError(message + kernel_lines(spec, lib, frames.split()))
    results = []
    for name, (shape, dtype) in outputs.items():
        per_order = [_typed(views[o, name][0], dtype, shape) for o in range(orders)]
        if per_order[0].size:
            _check_written(spec, name, per_order[0], views[0, name][1])
            _check_orders(spec, name, per_order, dtype)
        results.append(_returned(per_order[0], dtype))
    raw = np.frombuffer(shared, np.int64, slots, orders * ERROR_BYTES).copy() if counters else None
    return results, raw


def kernel_lines(spec, lib, frames: list[str]) -> str:
    """' (at file.metal:LINE <- caller lines)' for the failing call stack."""
    lines = _source_lines(spec, lib, frames)
    return f" (at {' <- '.join(lines)})" if lines else ""


def _site_line(spec, lib, offset: str) -> str:
    """'file.metal:LINE (<- caller lines)' of one access recorded by the race detector."""
    return " <- ".join(_source_lines(spec, lib, [offset])) or f"an unknown line (0x{offset})"


def _source_lines(spec, lib, frames: list[str]) -> list[str]:
    """The kernel's .metal / header lines of the call stack `frames`, innermost first."""
    lines = []
    for frame in _kernel_frames(spec, lib, frames):
        for location in frame:
            if location not in lines:
                lines.append(location)
    return lines


def _kernel_frames(spec, lib, offsets: list[str]) -> list[list[str]]:
    """Per offset into `lib` (hex), its .metal / header lines through inlined calls, innermost
    first, read with one addr2line call."""
    if not offsets or shutil.which("addr2line") is None:
        return [[] for _ in offsets]
    files = {os.path.basename(str(f)) for f in (spec.source_file, spec.header_file) if f}
    found = subprocess.run(
        ["addr2line", "-a", "-i", "-e", lib._name, *offsets],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    frames: list[list[str]] = []
    for line in found.splitlines():
        if line.startswith("0x"):  # -a: each offset opens its group of (inlined) frames
            frames.append([])
            continue
        location = os.path.basename(line.split(" ")[0])  # addr2line prefixes the build folder
        if frames and location.rsplit(":", 1)[0] in files:
            frames[-1].append(location)
    return frames


def _typed(raw: np.ndarray, dtype, shape) -> np.ndarray:
    return raw.view(STORAGE[dtype]).reshape(shape)


def _returned(array: np.ndarray, dtype) -> np.ndarray:
    if dtype == mx.bfloat16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.copy()


def _order_name(order: int) -> str:
    return _ORDER_NAMES[order] if order < 2 else f"shuffled (seed {order})"


def _check_written(spec, name, array, marks) -> None:
    written = marks.reshape(array.size, -1).all(axis=1)
    if not written.all():
        missing = np.flatnonzero(~written)
        where = np.unravel_index(missing[0], array.shape)
        raise EmulatorError(
            f"kernel '{spec.name}': output '{name}' {array.shape} has {missing.size} of "
            f"{array.size} elements never written, the first at flat index {missing[0]} = "
            f"{tuple(int(i) for i in where)}"
        )


def _check_orders(spec, name, per_order, dtype) -> None:
    first = per_order[0]
    for order, other in enumerate(per_order[1:], 1):
        differ = first.view(np.uint8).reshape(first.size, -1) != other.view(np.uint8).reshape(
            first.size, -1
        )
        differing = np.flatnonzero(differ.any(axis=1))
        if differing.size:
            i = differing[0]
            where = tuple(int(k) for k in np.unravel_index(i, first.shape))
            a, b = (_returned(x, dtype).flat[i].item() for x in (first, other))
            raise EmulatorError(
                f"kernel '{spec.name}': output '{name}' depends on the thread order: "
                f"{differing.size} elements differ between the forward and {_order_name(order)} "
                f"orders, the first at flat index {i} = {where} ({a!r} vs {b!r}): a data race "
                "(a missing barrier?) or a read of uninitialised threadgroup/output memory "
                "(poisoned differently in each order)"
            )
