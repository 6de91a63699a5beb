"""The chunked prefill kernels: chunked.py's WY/UT form in two dispatches.

`chunk_prepare.metal` computes what each chunk needs besides the state (W = (I + A)^-1 diag(β),
P and the decays), for all chunks in parallel and once per (batch, value head); the scan
(`chunked_scan.metal`) then walks the chunks, each threadgroup for 8·SG value columns.
`metal_chunked_scan` takes and returns what `chunked_scan` does (the scan inputs prepared by
`scan_inputs`), so it registers as a scan path beside it. The chunk is as long as 32 KiB of
threadgroup memory allows both kernels: 16 tokens at Dk = 128.
"""

from __future__ import annotations

import mlx.core as mx

from .kernel import KernelSpec, Launch

CHUNK_PREPARE = KernelSpec(
    name="qwen35_gated_delta_chunk_prepare",
    source_file="chunk_prepare.metal",
    input_names=("q", "k", "g", "beta", "T"),
    output_names=("W", "P", "gc"),
    header_file="chunked_scan.h",
)
CHUNKED_SCAN = KernelSpec(
    name="qwen35_gated_delta_chunked",
    source_file="chunked_scan.metal",
    input_names=("q", "k", "v", "W", "P", "gc", "state_in", "T"),
    output_names=("out", "state_out"),
    header_file="chunked_scan.h",
)

THREADGROUP_FLOATS = 32768 // 4  # Apple GPUs' threadgroup memory
CHUNKS = (64, 32, 16, 8)  # chunk lengths tried, longest first


def tile_stride(width: int) -> int:
    """The padded row stride of a threadgroup array (chunked_scan.h `tile_stride`): the smallest
    >= width that is 8 (mod 32) words."""
    return width + (8 - width) % 32


def prepare_floats(Dk: int, chunk: int) -> int:
    """Floats of threadgroup memory chunk_prepare.metal declares: q, k and A, rows padded by
    `tile_stride`; decay and beta."""
    return 2 * chunk * tile_stride(Dk) + chunk * tile_stride(chunk) + 2 * chunk


def scan_floats(Dk: int, chunk: int, columns: int) -> int:
    """Floats of threadgroup memory chunked_scan.metal declares: q, k and two halves of v / out,
    rows padded by `tile_stride`; decay."""
    return 2 * chunk * tile_stride(Dk) + 2 * chunk * tile_stride(columns) + chunk


def scan_simdgroups(Dv: int) -> int:
    """Simdgroups of a scan threadgroup, 8 value columns each: the most, up to 4, dividing Dv."""
    return next(s for s in (4, 3, 2, 1) if (Dv // 8) % s == 0)


def chunk_length(Dk: int, Dv: int) -> int:
    """The longest chunk both kernels' threadgroup memory holds."""
    if Dk % 8 or Dv % 8:
        raise ValueError(
            f"the chunked kernel needs Dk and Dv multiples of 8, got {Dk}, {Dv}: "
            "use the plain 'chunked' path"
        )
    columns = 8 * scan_simdgroups(Dv)
    for chunk in CHUNKS:
        needs = max(prepare_floats(Dk, chunk), scan_floats(Dk, chunk, columns))
        if needs <= THREADGROUP_FLOATS:
            return chunk
    raise ValueError(
        f"Dk = {Dk} is too large for the chunked kernel's threadgroup memory: "
        "use the plain 'chunked' path"
    )


def supports(Dk: int, Dv: int) -> bool:
    """Whether the kernels take these head dims."""
    try:
        chunk_length(Dk, Dv)
    except ValueError:
        return False
    return True


def chunk_prepare_call(q, k, g, beta, chunk: int) -> tuple[list, Launch]:
    """The prepare kernel's inputs (in `CHUNK_PREPARE.input_names` order) and launch: a
    threadgroup per (chunk, batch * value head), a simdgroup per lower 8 x 8 tile up to 4."""
    B, T, Hv, Dk = k.shape
    chunks = -(-T // chunk)
    blocks = chunk // 8
    simdgroups = min(4, blocks * (blocks + 1) // 2)
    launch = Launch(
        template=(("Dk", Dk), ("Hv", Hv), ("C", chunk), ("SG", simdgroups)),
        grid=(32, simdgroups * chunks, B * Hv),
        threadgroup=(32, simdgroups, 1),
        output_shapes=((B, Hv, chunks, chunk, chunk),) * 2 + ((B, Hv, chunks, chunk),),
        output_dtypes=(mx.float32,) * 3,
    )
    return [q, k, g, beta, T], launch


def chunked_scan_call(q, k, v, W, P, gc, state) -> tuple[list, Launch]:
    """The scan kernel's inputs (in `CHUNKED_SCAN.input_names` order) and launch, W, P and gc as
    the prepare kernel returns them: threadgroups over (value column blocks, batch * value
    heads), 8 columns per simdgroup."""
    B, T, Hv, Dv = v.shape
    Dk = q.shape[-1]
    simdgroups = scan_simdgroups(Dv)
    launch = Launch(
        template=(("Dk", Dk), ("Dv", Dv), ("Hv", Hv), ("C", W.shape[-1]), ("SG", simdgroups)),
        grid=(32, Dv // 8, B * Hv),
        threadgroup=(32, simdgroups, 1),
        output_shapes=((B, T, Hv, Dv), (B, Hv, Dv, Dk)),
        output_dtypes=(mx.float32, mx.float32),
    )
    return [q, k, v, W, P, gc, state, T], launch


def metal_chunked_scan(
    q: mx.array,  # [B, T, Hv, Dk] float32, normalised and scaled
    k: mx.array,  # [B, T, Hv, Dk] float32, normalised
    v: mx.array,  # [B, T, Hv, Dv]
    g: mx.array,  # [B, T, Hv] log decay (<= 0)
    beta: mx.array,  # [B, T, Hv]
    state: mx.array,  # [B, Hv, Dv, Dk] float32
) -> tuple[mx.array, mx.array]:
    """Scans T tokens; returns (out [B, T, Hv, Dv] float32, final state)."""
    chunk = chunk_length(q.shape[-1], v.shape[-1])
    W, P, gc = CHUNK_PREPARE.run(*chunk_prepare_call(q, k, g, beta, chunk))
    out, state = CHUNKED_SCAN.run(*chunked_scan_call(q, k, v, W, P, gc, state))
    return out, state
