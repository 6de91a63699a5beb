"""The chunked prefill kernel (`chunked_scan.metal`): chunked.py's WY/UT form in one dispatch.

Same inputs and outputs as `chunked_scan` (the scan inputs prepared by `scan_inputs`), so it
registers as a scan path beside it. The chunk is as long as 32 KiB of threadgroup memory allows:
16 tokens at Dk = 128.
"""

from __future__ import annotations

import mlx.core as mx

from .kernel import KernelSpec, Launch

CHUNKED_SCAN = KernelSpec(
    name="qwen35_gated_delta_chunked",
    source_file="chunked_scan.metal",
    input_names=("q", "k", "v", "g", "beta", "state_in", "T"),
    output_names=("out", "state_out"),
    header_file="chunked_scan.h",
)

THREADGROUP_FLOATS = 32768 // 4  # Apple GPUs' threadgroup memory


def tile_stride(width: int) -> int:
    """The padded row stride of a threadgroup array (chunked_scan.h `tile_stride`): the smallest
    >= width that is 8 (mod 32) words."""
    return width + (8 - width) % 32


def threadgroup_floats(Dk: int, chunk: int, columns: int) -> int:
    """Floats of threadgroup memory the kernel declares (see chunked_scan.metal): q, k, A, P
    and two halves of v / out, rows padded by `tile_stride`; decay and beta."""
    rows = tile_stride(Dk) + tile_stride(chunk) + tile_stride(columns)
    return 2 * chunk * rows + 2 * chunk


def chunked_scan_launch(B: int, T: int, Hv: int, Dk: int, Dv: int) -> Launch:
    """Threadgroups over (value column blocks, batch * value heads), 8 columns per simdgroup."""
    if Dk % 8 or Dv % 8:
        raise ValueError(
            f"the chunked kernel needs Dk and Dv multiples of 8, got {Dk}, {Dv}: "
            "use the plain 'chunked' path"
        )
    simdgroups = next(s for s in (4, 3, 2, 1) if (Dv // 8) % s == 0)
    columns = 8 * simdgroups
    fitting = [
        c for c in (64, 32, 16, 8) if threadgroup_floats(Dk, c, columns) <= THREADGROUP_FLOATS
    ]
    if not fitting:
        raise ValueError(
            f"Dk = {Dk} is too large for the chunked kernel's threadgroup memory: "
            "use the plain 'chunked' path"
        )
    return Launch(
        template=(("Dk", Dk), ("Dv", Dv), ("Hv", Hv), ("C", fitting[0]), ("SG", simdgroups)),
        grid=(32, simdgroups * (Dv // columns), B * Hv),
        threadgroup=(32, simdgroups, 1),
        output_shapes=((B, T, Hv, Dv), (B, Hv, Dv, Dk)),
        output_dtypes=(mx.float32, mx.float32),
    )


def supports(Dk: int, Dv: int) -> bool:
    """Whether `chunked_scan_launch` takes these head dims."""
    return Dk % 8 == 0 and Dv % 8 == 0 and threadgroup_floats(Dk, 8, 32) <= THREADGROUP_FLOATS


def chunked_scan_call(q, k, v, g, beta, state) -> tuple[list, Launch]:
    """The kernel's inputs (in `CHUNKED_SCAN.input_names` order) and launch; shapes as
    `chunked_scan`."""
    B, T, Hv, Dv = v.shape
    return [q, k, v, g, beta, state, T], chunked_scan_launch(B, T, Hv, q.shape[-1], Dv)


def metal_chunked_scan(
    q: mx.array,  # [B, T, Hv, Dk] float32, normalised and scaled
    k: mx.array,  # [B, T, Hv, Dk] float32, normalised
    v: mx.array,  # [B, T, Hv, Dv]
    g: mx.array,  # [B, T, Hv] log decay (<= 0)
    beta: mx.array,  # [B, T, Hv]
    state: mx.array,  # [B, Hv, Dv, Dk] float32
) -> tuple[mx.array, mx.array]:
    """Scans T tokens; returns (out [B, T, Hv, Dv] float32, final state)."""
    inputs, launch = chunked_scan_call(q, k, v, g, beta, state)
    out, state = CHUNKED_SCAN.run(inputs, launch)
    return out, state
