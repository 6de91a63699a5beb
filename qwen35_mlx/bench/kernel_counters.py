"""`qwen35-mlx bench kernels`: what each Metal kernel launch asks of the hardware (device bytes,
threadgroup-memory bank conflicts, barriers, threadgroup memory, threads) at the DeltaNet head
counts of each size, counted by the MSL-on-CPU emulator (docs/ARCHITECTURE.md §8).

The emulator lives in the repository's tests/msl_emulator and is not installed: the counters are
printed when that folder sits beside the package (a source checkout, e.g. `pip install -e .`);
elsewhere the command prints one line saying so and exits 0. It needs g++ (or $CXX).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import numpy as np

from ..gated_delta.chunked_kernel import (
    CHUNK_PREPARE,
    CHUNKED_SCAN,
    chunk_length,
    chunk_prepare_call,
    chunked_scan_call,
)
from ..gated_delta.decode_step import (
    DECODE_STEP,
    GATED_NORM,
    decode_step_call,
    gated_norm_launch,
)
from ..gated_delta.kernel import KERNEL_DIR
from .random_checkpoint import config_json
from .report import print_rows, progress

EMULATOR = Path(__file__).resolve().parents[2] / "tests" / "msl_emulator"
NO_EMULATOR = (
    "kernel counters: skipped, the MSL emulator (tests/msl_emulator in the repository) is not "
    "beside this installation; run `qwen35-mlx bench kernels` from a source checkout "
    "(pip install -e .)"
)
DECODE_DTYPE = mx.bfloat16  # the activations the model feeds the decode step
DECODE_KERNELS = ("decode step", "gated norm")  # the launches of one decoded token


@dataclass(frozen=True)
class Heads:
    """A size's DeltaNet head layout."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_taps: int


@dataclass(frozen=True)
class KernelRow:
    kernel: str  # "decode step", "gated norm", "chunk prepare" or "chunked scan"
    size: str
    counters: object  # msl_emulator.LaunchCounters
    state_bytes: int  # one read of the state the kernel carries (see `_state_bytes`)
    chunks: int | None  # chunks the chunked scan walks; None for the others


def heads_of(size: str) -> Heads:
    t = config_json(size)["text_config"]
    return Heads(
        t["linear_num_key_heads"],
        t["linear_num_value_heads"],
        t["linear_key_head_dim"],
        t["linear_value_head_dim"],
        t["linear_conv_kernel_dim"],
    )


def load_emulator() -> ModuleType | None:
    """The repository's msl_emulator package, or None where it is not beside the package."""
    if "msl_emulator" in sys.modules:
        return sys.modules["msl_emulator"]
    if not (EMULATOR / "__init__.py").exists():
        return None
    spec = importlib.util.spec_from_file_location(
        "msl_emulator", EMULATOR / "__init__.py", submodule_search_locations=[str(EMULATOR)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["msl_emulator"] = module
    spec.loader.exec_module(module)
    return module


def _normal(rng: np.random.Generator, *shape: int) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32))


def decode_rows(emulator, size: str, heads: Heads, batch: int) -> list[KernelRow]:
    """The fused decode step for one token, random activations and state: its launch, and the
    gated norm's where the step is split over more threadgroups than heads."""
    h, rng = heads, np.random.default_rng(0)
    channels = 2 * h.key_heads * h.key_dim + h.value_heads * h.value_dim
    inputs, launch = decode_step_call(
        qkv=_normal(rng, batch, 1, channels).astype(DECODE_DTYPE),
        z=_normal(rng, batch, 1, h.value_heads, h.value_dim).astype(DECODE_DTYPE),
        a=_normal(rng, batch, 1, h.value_heads).astype(DECODE_DTYPE),
        b=_normal(rng, batch, 1, h.value_heads).astype(DECODE_DTYPE),
        conv_weight=_normal(rng, channels, h.conv_taps, 1).astype(DECODE_DTYPE),
        A_log=_normal(rng, h.value_heads),
        dt_bias=_normal(rng, h.value_heads),
        norm_weight=_normal(rng, h.value_dim).astype(DECODE_DTYPE),
        norm_eps=1e-6,
        conv_state=_normal(rng, batch, h.conv_taps - 1, channels).astype(DECODE_DTYPE),
        state=_normal(rng, batch, h.value_heads, h.value_dim, h.key_dim),
        key_heads=h.key_heads,
    )
    counters = emulator.profile(DECODE_STEP, inputs, launch)
    state = _state_bytes(heads, batch, conv_state=True)
    rows = [KernelRow("decode step", size, counters, state, None)]
    if dict(launch.template)["SPLIT"] > 1:
        named = dict(zip(DECODE_STEP.input_names, inputs))
        shape = (batch, h.value_heads, h.value_dim)
        scan_out = mx.array(counters.outputs[0]).astype(DECODE_DTYPE).reshape(shape)
        norm_inputs = [scan_out, *(named[k] for k in GATED_NORM.input_names[1:])]
        norm_launch = gated_norm_launch(*shape, DECODE_DTYPE)
        norm = emulator.profile(GATED_NORM, norm_inputs, norm_launch)
        rows.append(KernelRow("gated norm", size, norm, state, None))
    return rows


def chunked_rows(emulator, size: str, heads: Heads, batch: int, tokens: int) -> list[KernelRow]:
    """The chunked prefill of `tokens` tokens, float32 scan inputs as `scan_inputs` makes them:
    the prepare launch, then the scan on its outputs."""
    h, rng = heads, np.random.default_rng(0)
    shape = (batch, tokens, h.value_heads)
    q, k, v = (_normal(rng, *shape, d) for d in (h.key_dim, h.key_dim, h.value_dim))
    g, beta = -mx.abs(_normal(rng, *shape)), mx.sigmoid(_normal(rng, *shape))
    state = _normal(rng, batch, h.value_heads, h.value_dim, h.key_dim)
    chunk = chunk_length(h.key_dim, h.value_dim)
    prepare = emulator.profile(CHUNK_PREPARE, *chunk_prepare_call(q, k, g, beta, chunk))
    W, P, gc = (mx.array(x) for x in prepare.outputs)
    scan = emulator.profile(CHUNKED_SCAN, *chunked_scan_call(q, k, v, W, P, gc, state))
    state_bytes, chunks = _state_bytes(heads, batch), math.ceil(tokens / chunk)
    return [
        KernelRow("chunk prepare", size, prepare, state_bytes, None),
        KernelRow("chunked scan", size, scan, state_bytes, chunks),
    ]


def _state_bytes(heads: Heads, batch: int, conv_state: bool = False) -> int:
    """Bytes of the float32 recurrent state [B, Hv, Dv, Dk], plus with `conv_state` the conv
    state [B, K - 1, C] in DECODE_DTYPE: what a DeltaNet layer carries from token to token."""
    h = heads
    state = batch * h.value_heads * h.value_dim * h.key_dim * 4
    channels = 2 * h.key_heads * h.key_dim + h.value_heads * h.value_dim
    conv = batch * (h.conv_taps - 1) * channels * DECODE_DTYPE.size
    return state + conv if conv_state else state


def measure(emulator, sizes, tokens: int, batch: int) -> list[KernelRow]:
    rows = []
    for size in sizes:
        heads = heads_of(size)
        progress(f"emulating the decode step, {size} heads")
        rows.extend(decode_rows(emulator, size, heads, batch))
        progress(f"emulating the chunked prefill, {size} heads, T = {tokens}")
        rows.extend(chunked_rows(emulator, size, heads, batch, tokens))
    return rows


def print_launches(rows: list[KernelRow]) -> None:
    columns = (
        "kernel",
        "heads",
        "threadgroups",
        "threads/tg",
        "tg memory B",
        "barriers/tg",
        "barriers/chunk",
        "device read B",
        "device written B",
        "vs state r+w",
        "distinct B",
        "distinct vs state",
        "SIMD steps",
        "conflicted",
        "worst degree",
        "8x8 products",
    )
    table = []
    for row in rows:
        c = row.counters
        moved = c.device_bytes
        per_chunk = c.barriers_per_threadgroup / row.chunks if row.chunks else None
        table.append(
            (
                row.kernel,
                row.size,
                c.threadgroups,
                c.threads_per_threadgroup,
                c.threadgroup_memory_bytes,
                c.barriers_per_threadgroup,
                "-" if per_chunk is None else f"{per_chunk:.2f}",
                c.device_bytes_read,
                c.device_bytes_written,
                f"{moved / (2 * row.state_bytes):.3f}x",
                c.distinct_device_bytes,
                f"{c.distinct_device_bytes / (2 * row.state_bytes):.3f}x",
                c.simd_steps,
                c.conflicted_steps,
                c.worst_degree,
                c.matrix_products,
            )
        )
    print_rows(columns, table, text_columns=2)
    print(
        "(vs state r+w: device bytes read + written over one read and one write of the state "
        "the kernel carries: for the decode step and the gated norm the DeltaNet layer's float32 "
        "recurrent state and its conv state, for the chunked prefill the recurrent state. Device "
        "read / written B: what the threads ask of memory, uncached, a byte read by several "
        "threads counted each time; distinct B: each byte a launch reads or writes counted once, "
        "what memory must move when caches serve the re-reads. conflicted: SIMD steps of "
        "threadgroup-memory accesses with a bank conflict; worst degree: most distinct words in "
        "one of 32 banks in a step; 8x8 products: simdgroup matrix products, all threadgroups)"
    )


def print_decode_token(rows: list[KernelRow], batch: int) -> None:
    """Device bytes of one decoded token's launches (the step and its gated norm), per size."""
    print()
    for size in dict.fromkeys(row.size for row in rows):
        launches = [row for row in rows if row.size == size and row.kernel in DECODE_KERNELS]
        requested = sum(r.counters.device_bytes for r in launches)
        distinct = sum(r.counters.distinct_device_bytes for r in launches)
        state = 2 * launches[0].state_bytes
        recurrent = 2 * _state_bytes(heads_of(size), batch)
        kernels = " + ".join(r.kernel for r in launches)
        print(
            f"One decoded token, {size} heads, B = {batch} ({kernels}): "
            f"requested {requested / state:.3f}x, distinct {distinct / state:.3f}x of the layer's "
            f"recurrent and conv state read and written once "
            f"({requested / recurrent:.3f}x, {distinct / recurrent:.3f}x of the recurrent state's)"
        )


def print_conflicts(rows: list[KernelRow]) -> None:
    """Lines with bank conflicts, the costliest first (extra wavefronts: sum of degree - 1)."""
    table = [
        (row, site)
        for row in rows
        for site in sorted(row.counters.bank_sites, key=lambda s: -s.extra_wavefronts)
        if site.conflicted_steps
    ]
    print("\nThreadgroup-memory bank conflicts by kernel line:")
    if not table:
        print("none")
        return
    print_rows(
        ("heads", "line", "source", "steps", "conflicted", "worst degree", "extra wavefronts"),
        [
            (
                row.size,
                site.line,
                _source_text(site.line),
                site.steps,
                site.conflicted_steps,
                site.worst_degree,
                site.extra_wavefronts,
            )
            for row, site in table
        ],
        text_columns=3,
    )


def print_buffers(rows: list[KernelRow]) -> None:
    """Device bytes per buffer (those the kernel touches)."""
    print("\nDevice bytes by buffer:")
    print_rows(
        ("kernel", "heads", "buffer", "read B", "written B"),
        [
            (row.kernel, row.size, name, read, row.counters.bytes_written[name])
            for row in rows
            for name, read in row.counters.bytes_read.items()
            if read or row.counters.bytes_written[name]
        ],
        text_columns=3,
    )


def _source_text(line: str) -> str:
    """The kernel source at 'file.metal:LINE', shortened."""
    file, _, number = line.rpartition(":")
    path = KERNEL_DIR / file
    if not number.isdigit() or not path.exists():
        return ""
    text = path.read_text().splitlines()[int(number) - 1].strip()
    return text if len(text) <= 60 else text[:57] + "..."


def bench_kernel_counters(heads, tokens: int, batch: int) -> int:
    if tokens < 1 or batch < 1:
        raise ValueError("--tokens and --batch must be at least 1")
    emulator = load_emulator()
    if emulator is None:
        print(NO_EMULATOR)
        return 0
    try:
        rows = measure(emulator, heads, tokens, batch)
    except emulator.EmulatorError as error:
        print(f"kernel counters: the emulator could not run the kernels: {error}")
        return 1
    print(
        f"Metal kernel launches counted by the MSL emulator: decode step (one token, "
        f"bfloat16 activations) and chunked prefill, prepare and scan (T = {tokens}, float32 "
        f"scan inputs), B = {batch}"
    )
    print_launches(rows)
    print_decode_token(rows, batch)
    print_buffers(rows)
    print_conflicts(rows)
    return 0
