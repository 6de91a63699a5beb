"""Per-launch counters of an emulated kernel: what it asks of device memory, threadgroup-memory
bank conflicts per SIMD step, barriers, threadgroup memory, threads (docs/ARCHITECTURE.md §8).

    from msl_emulator import profile
    counters = profile(spec, inputs, launch)  # LaunchCounters, outputs included
    counters.device_bytes_read, counters.bytes_written["state_out"], counters.worst_degree

What is counted (the first thread order, runtime.cpp `Counters`):
- device bytes: per buffer, sizeof(element) for every element access a thread makes through a
  device or constant pointer, as the kernel asks it of memory (no caching, no coalescing: 32
  lanes reading one float each count 128 bytes, a lane reading the same float twice counts it
  twice; a simdgroup_load of an 8 x 8 float tile counts 256 bytes). Input accesses are reads;
  an output access is a write when it changes the bytes and a read otherwise (a store of the
  value already there counts as a read; a read-modify-write `out[i] += x` as one write).
  Scalars passed by reference (`constant T&`, e.g. `T`, `norm_eps`) and output elements larger
  than 32 bytes are not counted.
- distinct device bytes: per buffer, each byte that some access read (wrote) counted once: the
  least the launch moves to or from memory (caches serving every re-read), where the bytes
  above are the most.
- bank conflicts: threadgroup memory as 32 banks of 4-byte words. The lanes of a SIMD group run
  one after another here, so the i-th access of each lane at one access site (one load or store
  instruction in the compiled emulator, mapped to its .metal line) makes the i-th SIMD step of
  that site; its degree is the most distinct words in one bank (words shared by lanes are
  broadcasts). A step with degree > 1 conflicts and costs degree - 1 extra wavefronts. Sites on
  one line are summed. The model's limits: docs/ARCHITECTURE.md §8.
- barriers: threadgroup_barrier calls completed, per threadgroup and summed.
- matrix products: simdgroup_multiply / simdgroup_multiply_accumulate calls of a SIMD group
  (one 8 x 8 x 8 product, 512 multiply-adds, each), per threadgroup and summed.
- threadgroup memory: the bytes the threadgroup's variables take (16-byte aligned each).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Layout of the raw counters (runtime.cpp `Counters`).
HEADER = 8
BARRIERS, BARRIERS_MAX, THREADGROUP_BYTES, SITES, SITES_DROPPED, PRODUCTS, PRODUCTS_MAX = range(7)
BUFFER_FIELDS = 4
SITE_FIELDS = 6


@dataclass(frozen=True)
class BankSite:
    """Threadgroup-memory accesses of one kernel line, over the whole launch."""

    line: str  # "chunked_scan.metal:97", or the access's offset in the library if unknown
    accesses: int  # lane accesses
    steps: int  # SIMD steps (up to 32 lanes each)
    conflicted_steps: int  # steps with a bank conflict (degree > 1)
    extra_wavefronts: int  # sum over steps of degree - 1
    worst_degree: int  # most distinct words in one bank in one step (1: no conflict)


@dataclass(frozen=True)
class LaunchCounters:
    kernel: str
    outputs: list[np.ndarray]  # as `emulate` returns them
    threadgroups: int
    threads_per_threadgroup: int
    threadgroup_memory_bytes: int  # the most one threadgroup allocated
    barriers: int  # summed over threadgroups
    barriers_per_threadgroup: int  # the most one threadgroup completed
    matrix_products: int  # 8 x 8 simdgroup matrix products, summed over threadgroups
    matrix_products_per_threadgroup: int  # the most one threadgroup made
    bytes_read: dict[str, int]  # per buffer
    bytes_written: dict[str, int]  # per buffer
    distinct_bytes_read: dict[str, int]  # per buffer, each byte once
    distinct_bytes_written: dict[str, int]  # per buffer, each byte once
    bank_sites: tuple[BankSite, ...]  # per kernel line, in line order

    @property
    def device_bytes_read(self) -> int:
        return sum(self.bytes_read.values())

    @property
    def device_bytes_written(self) -> int:
        return sum(self.bytes_written.values())

    @property
    def device_bytes(self) -> int:
        """Bytes read plus bytes written, as the threads request them."""
        return self.device_bytes_read + self.device_bytes_written

    @property
    def distinct_device_bytes(self) -> int:
        """Distinct bytes read plus distinct bytes written: what memory must move at least."""
        return sum(self.distinct_bytes_read.values()) + sum(self.distinct_bytes_written.values())

    @property
    def simd_steps(self) -> int:
        return sum(s.steps for s in self.bank_sites)

    @property
    def conflicted_steps(self) -> int:
        return sum(s.conflicted_steps for s in self.bank_sites)

    @property
    def worst_degree(self) -> int:
        return max((s.worst_degree for s in self.bank_sites), default=1)

    def site(self, line: str) -> BankSite:
        """The bank counters of one line ("decode_step.metal:42")."""
        found = [s for s in self.bank_sites if s.line == line]
        if not found:
            raise KeyError(f"no threadgroup access counted at {line}: {self.lines()}")
        return found[0]

    def lines(self) -> list[str]:
        return [s.line for s in self.bank_sites]


def site_rows(raw: np.ndarray, buffers: int) -> np.ndarray:
    """The raw per-site rows [sites, SITE_FIELDS]."""
    start = HEADER + BUFFER_FIELDS * buffers
    return raw[start : start + SITE_FIELDS * int(raw[SITES])].reshape(-1, SITE_FIELDS)


def launch_counters(spec, launch, outputs, raw, buffer_names, line_of) -> LaunchCounters:
    """LaunchCounters from the raw counters; `line_of(offsets)` names each access site's line."""
    if raw[SITES_DROPPED]:
        raise RuntimeError(f"{raw[SITES_DROPPED]} access sites past the counters' table")
    rows = site_rows(raw, len(buffer_names))
    lines = line_of([int(offset) for offset in rows[:, 0]])
    merged: dict[str, list[int]] = {}
    for (offset, accesses, steps, conflicted, extra, worst), line in zip(rows.tolist(), lines):
        line = line or f"0x{offset:x}"
        total = merged.setdefault(line, [0, 0, 0, 0, 1])
        for i, value in enumerate((accesses, steps, conflicted, extra)):
            total[i] += value
        total[4] = max(total[4], worst)
    per_buffer = raw[HEADER : HEADER + BUFFER_FIELDS * len(buffer_names)]
    read, written, distinct_read, distinct_written = per_buffer.reshape(-1, BUFFER_FIELDS).T
    groups = [-(-g // t) for g, t in zip(launch.grid, launch.threadgroup)]
    return LaunchCounters(
        kernel=spec.name,
        outputs=outputs,
        threadgroups=int(np.prod(groups)),
        threads_per_threadgroup=int(np.prod(launch.threadgroup)),
        threadgroup_memory_bytes=int(raw[THREADGROUP_BYTES]),
        barriers=int(raw[BARRIERS]),
        barriers_per_threadgroup=int(raw[BARRIERS_MAX]),
        matrix_products=int(raw[PRODUCTS]),
        matrix_products_per_threadgroup=int(raw[PRODUCTS_MAX]),
        bytes_read=dict(zip(buffer_names, read.tolist())),
        bytes_written=dict(zip(buffer_names, written.tolist())),
        distinct_bytes_read=dict(zip(buffer_names, distinct_read.tolist())),
        distinct_bytes_written=dict(zip(buffer_names, distinct_written.tolist())),
        bank_sites=tuple(
            BankSite(line, *values) for line, values in sorted(merged.items(), key=_line_order)
        ),
    )


def _line_order(item) -> tuple:
    file, _, number = item[0].rpartition(":")
    return (file, int(number)) if number.isdigit() else (item[0], 0)
