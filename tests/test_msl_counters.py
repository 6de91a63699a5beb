"""The emulator's launch counters: planted kernels with hand-counted bytes, bank conflicts and
barriers, and the real kernels' device bytes against a hand formula."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.gated_delta.chunked_kernel import (
    CHUNK_PREPARE,
    CHUNKED_SCAN,
    chunk_length,
    chunk_prepare_call,
    chunked_scan_call,
)
from qwen35_mlx.gated_delta.decode_step import (
    DECODE_STEP,
    GATED_NORM,
    decode_step_call,
    gated_norm_launch,
)
from qwen35_mlx.gated_delta.kernel import KernelSpec, Launch

from msl_emulator import emulate, profile

PLANTED = Path(__file__).parent / "msl_kernels" / "counters"
rng = np.random.default_rng(0)


def line_of(file: Path, snippet: str) -> str:
    """'name.metal:LINE' of the one line holding `snippet`."""
    found = [i for i, line in enumerate(file.read_text().splitlines(), 1) if snippet in line]
    assert len(found) == 1, f"{snippet!r} is on lines {found} of {file.name}"
    return f"{file.name}:{found[0]}"


def test_device_bytes_read_and_written():
    # 100 threads in 4 threadgroups of 32 (the last partial) each read a float and a half; the
    # first 40 write a float
    spec = KernelSpec("read_write", str(PLANTED / "read_write.metal"), ("inp", "idx"), ("out",))
    inp = rng.standard_normal(100).astype(np.float32)
    idx = np.arange(100, dtype=np.float16)
    launch = Launch((("M", 40),), (100, 1, 1), (32, 1, 1), ((40,),), (mx.float32,))
    counters = profile(spec, [inp, idx], launch)
    assert counters.bytes_read == {"inp": 100 * 4, "idx": 100 * 2, "out": 0}
    assert counters.bytes_written == {"inp": 0, "idx": 0, "out": 40 * 4}
    assert (counters.device_bytes_read, counters.device_bytes_written) == (600, 160)
    assert (counters.threadgroups, counters.threads_per_threadgroup) == (4, 32)
    assert (counters.barriers, counters.threadgroup_memory_bytes, counters.bank_sites) == (0, 0, ())
    assert (counters.matrix_products, counters.matrix_products_per_threadgroup) == (0, 0)
    np.testing.assert_array_equal(counters.outputs[0], inp[:40] + idx[:40])
    # each byte accessed once: distinct bytes equal the requested ones
    assert counters.distinct_bytes_read == counters.bytes_read
    assert counters.distinct_bytes_written == counters.bytes_written
    assert counters.distinct_device_bytes == 760


def test_distinct_bytes_count_each_byte_once():
    # 96 threads each read table[i % 8] 5 times and write out[i] 5 times (values that change)
    spec = KernelSpec("repeated", str(PLANTED / "repeated.metal"), ("table",), ("out",))
    table = rng.uniform(1.0, 2.0, 8).astype(np.float32)  # > 0: every running sum changes
    launch = Launch((("W", 8), ("R", 5)), (96, 1, 1), (32, 1, 1), ((96,),), (mx.float32,))
    counters = profile(spec, [table], launch)
    assert counters.bytes_read == {"table": 96 * 5 * 4, "out": 0}
    assert counters.bytes_written == {"table": 0, "out": 96 * 5 * 4}
    assert counters.distinct_bytes_read == {"table": 8 * 4, "out": 0}
    assert counters.distinct_bytes_written == {"table": 0, "out": 96 * 4}
    assert counters.distinct_device_bytes == 8 * 4 + 96 * 4
    np.testing.assert_allclose(counters.outputs[0], 5 * table[np.arange(96) % 8], rtol=1e-6)


BANK_STRIDE = KernelSpec(
    "bank_stride", str(PLANTED / "bank_stride.metal"), ("inp", "stride", "barriers"), ("out",)
)


# lane l reads word l * stride: words per bank, by hand
@pytest.mark.parametrize(
    "stride, degree",
    [(1, 1), (2, 2), (16, 16), (32, 32), (0, 1), (33, 1)],
    ids=["stride1", "stride2", "stride16", "stride32", "broadcast", "padded33"],
)
def test_bank_conflict_degree(stride, degree):
    groups, threads = 2, 64  # two threadgroups of two SIMD groups
    inp = rng.standard_normal(groups * threads).astype(np.float32)
    launch = Launch(
        (), (groups * threads, 1, 1), (threads, 1, 1), ((groups * threads,),), (mx.float32,)
    )
    counters = profile(BANK_STRIDE, [inp, stride, 0], launch)
    read = counters.site(line_of(PLANTED / "bank_stride.metal", "tile[lane * stride]"))
    steps = groups * threads // 32  # one read per lane: one step per SIMD group
    assert (read.accesses, read.steps) == (groups * threads, steps)
    assert read.worst_degree == degree
    assert read.conflicted_steps == (steps if degree > 1 else 0)
    assert read.extra_wavefronts == steps * (degree - 1)
    # the fill: 33 stride-1 store steps of SIMD group 0 per threadgroup, conflict-free
    fill = counters.site(line_of(PLANTED / "bank_stride.metal", "tile[w] = float(w)"))
    assert (fill.steps, fill.conflicted_steps, fill.worst_degree) == (groups * 33, 0, 1)
    assert counters.conflicted_steps == read.conflicted_steps
    assert counters.worst_degree == degree
    assert counters.threadgroup_memory_bytes == 32 * 33 * 4
    expected = np.arange(groups * threads) % 32 * stride + inp
    np.testing.assert_array_equal(counters.outputs[0], expected.astype(np.float32))


@pytest.mark.parametrize("extra", [0, 3])
def test_barriers_counted_per_threadgroup_and_launch(extra):
    launch = Launch((), (96, 1, 1), (32, 1, 1), ((96,),), (mx.float32,))
    counters = profile(BANK_STRIDE, [np.zeros(96, np.float32), 1, extra], launch)
    assert counters.barriers_per_threadgroup == 1 + extra  # the fill's barrier, then `extra`
    assert counters.barriers == 3 * (1 + extra)
    assert counters.threadgroups == 3


def test_matrix_products_counted_per_threadgroup_and_launch():
    # C = A @ B by 8 x 8 tiles, one SIMD group per tile of C: K / 8 products each
    m, k, n = 16, 24, 32
    spec = KernelSpec("matmul8", str(PLANTED.parent / "matmul8.metal"), ("A", "B"), ("C",))
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    template = (("M", m), ("N", n), ("K", k))
    launch = Launch(template, (32 * n // 8, m // 8, 1), (32, 1, 1), ((m, n),), (mx.float32,))
    counters = profile(spec, [a, b], launch)
    tiles = (m // 8) * (n // 8)
    assert counters.threadgroups == tiles
    assert counters.matrix_products_per_threadgroup == k // 8
    assert counters.matrix_products == tiles * k // 8
    np.testing.assert_allclose(counters.outputs[0], a @ b, rtol=1e-5, atol=1e-5)


def test_profile_outputs_match_emulate():
    launch = Launch((), (64, 1, 1), (64, 1, 1), ((64,),), (mx.float32,))
    inputs = [rng.standard_normal(64).astype(np.float32), 3, 1]
    (plain,) = emulate(BANK_STRIDE, inputs, launch)
    np.testing.assert_array_equal(profile(BANK_STRIDE, inputs, launch).outputs[0], plain)


def normal(*shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("B", [2, 32], ids=["split4", "whole_heads"])
def test_decode_step_device_bytes_by_hand(B):
    # B = 2: 4 heads are fewer than 64, each is split over 4 threadgroups of 2 state rows and
    # the gated norm follows in its own launch; B = 32: 64 heads, one threadgroup each
    Hk, Hv, Dk, Dv, K = 1, 2, 32, 8, 4
    C = 2 * Hk * Dk + Hv * Dv
    bf16 = mx.bfloat16
    inputs, launch = decode_step_call(
        qkv=normal(B, 1, C).astype(bf16),
        z=normal(B, 1, Hv, Dv).astype(bf16),
        a=normal(B, 1, Hv).astype(bf16),
        b=normal(B, 1, Hv).astype(bf16),
        conv_weight=normal(C, K, 1).astype(bf16),
        A_log=normal(Hv),
        dt_bias=normal(Hv),
        norm_weight=normal(Dv).astype(bf16),
        norm_eps=1e-6,
        conv_state=normal(B, K - 1, C).astype(bf16),
        state=normal(B, Hv, Dv, Dk),
        key_heads=Hk,
    )
    counters = profile(DECODE_STEP, inputs, launch)
    heads, e = B * Hv, 2  # bf16 bytes
    split = 4 if B == 2 else 1
    rows = Dv // split  # state rows of a threadgroup, a simdgroup each
    groups, threads = heads * split, 32 * rows
    state = heads * Dv * Dk * 4
    channels = 2 * Dk + rows  # each threadgroup convolves its key head's q, k and its v rows
    shifted = B * (Hv * Dv + Hk * 2 * Dk)  # channels whose conv state moves (q, k once)
    norm = heads * Dv * e if split == 1 else 0  # read by the gated norm at the end
    assert counters.bytes_read == {
        "qkv": groups * channels * e,
        "z": norm,
        "a": groups * e,  # thread 0 computes the decay and beta
        "b": groups * e,
        "conv_state": groups * channels * (K - 1) * e,  # each input read once
        "conv_weight": groups * channels * K * e,
        "A_log": groups * 4,
        "dt_bias": groups * 4,
        "norm_weight": norm,
        "state_in": state,  # one read of the state
        "norm_eps": 0,  # a constant reference: not counted
        "out": 0,
        "state_out": 0,
        "conv_state_out": 0,
    }
    written = {"out": heads * Dv * e, "state_out": state, "conv_state_out": shifted * (K - 1) * e}
    assert counters.bytes_written == {name: written.get(name, 0) for name in counters.bytes_read}
    # each byte once: the split's threadgroups re-read their head's q / k conv inputs and gates,
    # and every byte of the conv state is read (and written) once in all
    conv_state = B * (K - 1) * C * e
    assert counters.distinct_bytes_read == {
        **{name: 0 for name in counters.bytes_read},
        "qkv": B * C * e,
        "z": norm,
        "a": heads * e,
        "b": heads * e,
        "conv_state": conv_state,
        "conv_weight": C * K * e,
        "A_log": Hv * 4,
        "dt_bias": Hv * 4,
        "norm_weight": Dv * e if split == 1 else 0,
        "state_in": state,
    }
    distinct_written = {"out": heads * Dv * e, "state_out": state, "conv_state_out": conv_state}
    assert counters.distinct_bytes_written == {
        name: distinct_written.get(name, 0) for name in counters.bytes_read
    }
    assert (counters.threadgroups, counters.threads_per_threadgroup) == (groups, threads)
    assert counters.barriers_per_threadgroup == (2 if split == 1 else 1)
    # mixed, gates and the head's outputs for the norm at the end, each array 16-byte aligned
    offset = 0
    for floats in (2 * Dk + rows, 2, Dv if split == 1 else 1):
        offset = -(-offset // 16) * 16 + floats * 4
    assert counters.threadgroup_memory_bytes == offset
    if split > 1:
        scan_out = mx.array(counters.outputs[0]).astype(bf16).reshape(B, Hv, Dv)
        named = dict(zip(DECODE_STEP.input_names, inputs))
        norm_inputs = [scan_out, named["z"], named["norm_weight"], named["norm_eps"]]
        gated = profile(GATED_NORM, norm_inputs, gated_norm_launch(B, Hv, Dv, bf16))
        each = heads * Dv * e
        assert gated.bytes_read == {
            "o": each,
            "z": each,
            "norm_weight": each,
            "norm_eps": 0,
            "y": 0,
        }
        assert gated.bytes_written == {"o": 0, "z": 0, "norm_weight": 0, "norm_eps": 0, "y": each}
        assert (gated.threadgroups, gated.barriers) == (heads, 0)


def test_chunked_scan_device_bytes_by_hand():
    # two chunks of 32 tokens (the second holds 8); the scan in two column blocks of 32 value
    # columns, the prepare kernel once per chunk
    B, T, Hv, Dk, Dv = 1, 40, 1, 16, 64
    shape = (B, T, Hv)
    q, k, v = normal(*shape, Dk), normal(*shape, Dk), normal(*shape, Dv)
    g, beta = -mx.abs(normal(*shape)), mx.sigmoid(normal(*shape))
    C, chunks, blocks, simdgroups = 32, 2, 2, 4
    assert chunk_length(Dk, Dv) == C
    prepare = profile(CHUNK_PREPARE, *chunk_prepare_call(q, k, g, beta, C))
    W, P, gc = (mx.array(x) for x in prepare.outputs)
    inputs, launch = chunked_scan_call(q, k, v, W, P, gc, normal(B, Hv, Dv, Dk))
    assert launch.grid[1] // launch.threadgroup[1] == blocks
    assert launch.threadgroup[1] == simdgroups
    scan = profile(CHUNKED_SCAN, inputs, launch)
    state = B * Hv * Dv * Dk * 4

    # prepare: q, k, beta of the real tokens once; each thread i < C sums g over the chunk's
    # tokens j <= i that are real: 32 and 8 of them; W, P [C, C] and gc [C] per chunk
    g_sums = sum(min(i + 1, live) for live in (32, 8) for i in range(C))
    assert prepare.bytes_read == {
        "q": B * T * Hv * Dk * 4,
        "k": B * T * Hv * Dk * 4,
        "g": B * Hv * g_sums * 4,
        "beta": B * T * Hv * 4,
        "T": 0,
        "W": 0,
        "P": 0,
        "gc": 0,
    }
    written = {"W": chunks * C * C * 4, "P": chunks * C * C * 4, "gc": chunks * C * 4}
    assert prepare.bytes_written == {name: written.get(name, 0) for name in prepare.bytes_read}
    assert (prepare.threadgroups, prepare.barriers_per_threadgroup) == (chunks, 2)
    # q, k and A, rows padded to 8 (mod 32) words (Dk = 16 and C = 32 both become 40); gc, beta
    assert prepare.threadgroup_memory_bytes == (3 * C * 40 + 2 * C) * 4

    # scan: every column block stages q and k, its own columns of v, and gc; each simdgroup
    # loads the 10 lower 8 x 8 tiles of W and of P per chunk
    lower_tiles = (C // 8) * (C // 8 + 1) // 2
    tiles = blocks * chunks * simdgroups * lower_tiles * 64 * 4
    assert scan.bytes_read == {
        "q": blocks * B * T * Hv * Dk * 4,
        "k": blocks * B * T * Hv * Dk * 4,
        "v": B * T * Hv * Dv * 4,
        "W": tiles,
        "P": tiles,
        "gc": blocks * chunks * C * 4,
        "state_in": state,
        "T": 0,
        "out": 0,
        "state_out": 0,
    }
    written = {"out": B * T * Hv * Dv * 4, "state_out": state}
    assert scan.bytes_written == {name: written.get(name, 0) for name in scan.bytes_read}
    assert scan.barriers_per_threadgroup == 2 * chunks  # two per chunk
    # q, k and two halves of v / out (Dk = 16 and 32 columns both padded to 40); gc
    assert scan.threadgroup_memory_bytes == (2 * C * 40 + 2 * C * 40 + C) * 4

    # 8 x 8 simdgroup products, NB = 4 token blocks, Dk / 8 = 2 key tiles. Prepare, per chunk:
    # K K^T and Q K^T on the 10 lower tiles, seven per diagonal inverse, and W's block (i, j)
    # below the diagonal i - j products plus one by the inverse. Scan, per simdgroup and chunk:
    # S k^T and S q^T (2 NB Dk / 8), R W^T and X P^T on the lower tiles, the state update
    nb, key_tiles = C // 8, Dk // 8
    below = sum(i - j + 1 for i in range(nb) for j in range(i))
    per_chunk = 2 * lower_tiles * key_tiles + 7 * nb + below
    assert prepare.matrix_products_per_threadgroup == per_chunk
    assert prepare.matrix_products == chunks * per_chunk
    per_simdgroup = 2 * nb * key_tiles + 2 * lower_tiles + nb * key_tiles
    assert scan.matrix_products_per_threadgroup == chunks * simdgroups * per_simdgroup
    assert scan.matrix_products == blocks * chunks * simdgroups * per_simdgroup
