"""The MSL-on-CPU emulator on toy kernels: correct ones match numpy, planted bugs are caught."""

import dataclasses
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.gated_delta.kernel import KernelSpec, Launch

import msl_emulator
from metrics import relative_error
from msl_emulator import EmulatorError, emulate, generated_source

KERNELS = Path(__file__).parent / "msl_kernels"
PLANTED = KERNELS / "planted"
rng = np.random.default_rng(0)


def spec(file: Path, inputs=("inp",), outputs=("out",)) -> KernelSpec:
    return KernelSpec(file.stem, str(file), tuple(inputs), tuple(outputs))  # absolute source_file


def launch(grid, group, shapes, dtypes=(mx.float32,), template=()) -> Launch:
    return Launch(tuple(template), grid, group, tuple(shapes), tuple(dtypes))


def bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 by MLX, as float32."""
    return np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))


EXP_SCALE = spec(KERNELS / "exp_scale.metal", ("inp", "scale"))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_elementwise_template_matches_numpy(dtype):
    x = rng.standard_normal(1000).astype(np.float32)  # 1000: a partial last threadgroup
    inp = mx.array(x).astype(dtype)
    (out,) = emulate(
        EXP_SCALE,
        [inp, np.array(0.5, np.float32)],
        launch((1000, 1, 1), (256, 1, 1), [(1000,)], [dtype], [("T", dtype)]),
    )
    reference = np.exp(np.array(inp.astype(mx.float32), np.float64)) * 0.5
    tolerance = {mx.float32: 1e-6, mx.float16: 1e-3, mx.bfloat16: 1e-2}[dtype]
    assert relative_error(out, reference) <= tolerance
    if dtype == mx.bfloat16:  # outputs are exact bfloat16 values, rounded to nearest even
        assert np.array_equal(out, bf16(out))


def test_agrees_with_mlx():
    """The emulator computes what MLX computes: MLX's own ops, and the real kernel on Metal."""
    x = mx.array(rng.standard_normal((64,)).astype(np.float32))
    scale = mx.array(1.5)
    run = launch((64, 1, 1), (32, 1, 1), [(64,)], template=[("T", mx.float32)])
    (ours,) = emulate(EXP_SCALE, [x, scale], run)
    assert relative_error(ours, np.array(mx.exp(x) * scale)) <= 1e-6
    if mx.metal.is_available():
        (metal,) = EXP_SCALE.run([x, scale], run)
        assert relative_error(ours, np.array(metal)) <= 1e-6


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_threadgroup_reduction_matches_numpy(dtype):
    rows, n = 3, 256
    inp = mx.array(rng.standard_normal((rows, n)).astype(np.float32)).astype(dtype)
    (out,) = emulate(
        spec(KERNELS / "row_sum.metal"),
        [inp],
        launch((n, rows, 1), (n, 1, 1), [(rows,)], template=[("T", dtype), ("N", n)]),
    )
    reference = np.array(inp.astype(mx.float32), np.float64).sum(axis=1)
    assert relative_error(out, reference) <= 1e-6


@pytest.mark.parametrize("n", [32, 128, 1024], ids=lambda n: f"N{n}")
def test_simd_reduction_matches_numpy(n):
    rows = 2
    x = rng.standard_normal((rows, n)).astype(np.float32)
    total, maximum, prefix = emulate(
        spec(KERNELS / "simd_reduce.metal", outputs=("total", "maximum", "prefix")),
        [x],
        launch(
            (n, rows, 1), (n, 1, 1), [(rows,), (rows,), (rows, n)], [mx.float32] * 3, [("N", n)]
        ),
    )
    x64 = x.astype(np.float64)
    assert relative_error(total, x64.sum(axis=1)) <= 1e-6
    assert np.array_equal(maximum, x.max(axis=1))
    groups = x64.reshape(rows, n // 32, 32).cumsum(axis=2).reshape(rows, n)
    assert relative_error(prefix, groups) <= 1e-6


def test_simdgroup_matrix_matmul_matches_numpy():
    m, k, n = 16, 24, 32
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    (c,) = emulate(
        spec(KERNELS / "matmul8.metal", ("A", "B"), ("C",)),
        [a, b],
        launch(
            (32 * n // 8, m // 8, 1), (32, 1, 1), [(m, n)], template=[("M", m), ("N", n), ("K", k)]
        ),
    )
    assert relative_error(c, a.astype(np.float64) @ b) <= 1e-6


TWICE = dataclasses.replace(spec(KERNELS / "twice.metal"), header_file=str(KERNELS / "twice.h"))


def test_header_helper_with_device_pointer():
    x = rng.standard_normal(64).astype(np.float32)
    (out,) = emulate(TWICE, [x], launch((64, 1, 1), (32, 1, 1), [(64,)], template=[("OFFSET", 0)]))
    assert np.array_equal(out, 2 * x)


def test_out_of_bounds_in_header_names_both_lines():
    x = rng.standard_normal(64).astype(np.float32)
    with pytest.raises(
        EmulatorError,
        match=r"buffer 'inp': element index 64 .*"
        r"\(at twice.h:3 <- twice.metal:4\)",
    ):
        emulate(TWICE, [x], launch((64, 1, 1), (32, 1, 1), [(64,)], template=[("OFFSET", 1)]))


def run_planted(name: str, n: int = 64, group: int = 32, template=()):
    x = rng.standard_normal(n).astype(np.float32)
    emulate(
        spec(PLANTED / f"{name}.metal"),
        [x],
        launch((n, 1, 1), (group, 1, 1), [(n,)], template=template),
    )


PLANTED_BUGS = {
    "out_of_bounds": r"out-of-bounds pointer access to device buffer 'inp': element index 64 .*"
    r"holds 256 bytes \(64 elements\) \(at out_of_bounds.metal:4\)",
    "threadgroup_out_of_bounds": r"out-of-bounds array access to threadgroup buffer 'staged': "
    r"element index 32",
    "divergent_simd_sum": r"SIMD-group function in divergent control flow.*simd_sum "
    r"\(divergent_simd_sum.metal:6",
    "barrier_after_return": r"threadgroup_barrier not reached by every thread \(an early return",
    "barriers_at_different_sites": r"threads wait at different threadgroup_barrier calls.*"
    r"barriers_at_different_sites.metal:[68]",
    "unwritten_output": r"output 'out' \(64,\) has 9 of 64 elements never written, the first at "
    r"flat index 3",
    "uninitialised_threadgroup_read": r"output 'out' depends on the thread order.*index 0 ",
    "uninitialised_local_read": r"output 'out' depends on the thread order.*index 3 ",
    "threadgroup_memory_too_large": r"threadgroup memory exceeds 32768 bytes at 'second'",
    "stack_overflow": r"crashed with signal 11",
}


@pytest.mark.parametrize(
    "name, message", [pytest.param(*item, id=item[0]) for item in PLANTED_BUGS.items()]
)
def test_planted_bug_is_reported(name, message):
    with pytest.raises(EmulatorError, match=message) as caught:
        run_planted(name)
    assert f"kernel '{name}'" in str(caught.value)


def test_planted_bug_reports_thread_and_line():
    with pytest.raises(EmulatorError) as caught:
        run_planted("out_of_bounds")
    text = str(caught.value)
    assert "thread_position_in_grid (63, 0, 0)" in text  # the last thread reads inp[64]


def test_planted_missing_barrier_is_a_race():
    n = 256
    x = rng.standard_normal((2, n)).astype(np.float32)
    # forward order: thread 0 reads partial[1], then thread 1 adds partial[129] into it
    with pytest.raises(
        EmulatorError,
        match=(
            r"thread_index_in_threadgroup 1 .*data race on threadgroup array 'partial' element 1 "
            r".*writes it at missing_barrier.metal:10 and thread_index_in_threadgroup 0 "
            r"\(simdgroup 0, lane 0\) read it at missing_barrier.metal:10"
        ),
    ):
        emulate(
            spec(PLANTED / "missing_barrier.metal"),
            [x],
            launch((n, 2, 1), (n, 1, 1), [(2,)], template=[("N", n)]),
        )


# Races the emulator's schedule hides from the comparison of thread orders (every thread runs to
# its next sync before any goes on), found by the race detector.
HIDDEN_RACES = {
    "simd_sum_orders_only_its_group": (
        r"thread_index_in_threadgroup 0 \(simdgroup 0, lane 0\), forward thread order: data race "
        r"on threadgroup array 'staged' element 32 \(4-byte elements\): this thread reads it .*"
        r"at simd_sum_orders_only_its_group.metal:11 and thread_index_in_threadgroup 32 "
        r"\(simdgroup 1, lane 0\) wrote it at simd_sum_orders_only_its_group.metal:9, in another "
        r"SIMD group"
    ),
    "output_written_twice": (
        r"thread_position_in_grid \(32, 0, 0\).*data race on device output 'out' element 32 .*"
        r"writes it at output_written_twice.metal:12 and thread_position_in_grid \(0, 0, 0\) "
        r"\(threadgroup \(0, 0, 0\), thread_index_in_threadgroup 0\) wrote it at "
        r"output_written_twice.metal:9, two threads write the same output element"
    ),
}


@pytest.mark.parametrize(
    "name, message", [pytest.param(*item, id=item[0]) for item in HIDDEN_RACES.items()]
)
def test_race_hidden_from_thread_orders_is_caught(name, message):
    with pytest.raises(EmulatorError, match=message):
        run_planted(name, n=128, group=64)


def test_simd_function_orders_the_lanes_of_its_group(tmp_path):
    """simd_sum_orders_only_its_group.metal within one SIMD group: no race."""
    kernel = tmp_path / "lanes_swap.metal"
    kernel.write_text(
        "uint t = thread_position_in_threadgroup.x;\n"
        "threadgroup float staged[32];\n"
        "staged[t] = inp[thread_position_in_grid.x];\n"
        "const float total = simd_sum(staged[t]);\n"
        "out[thread_position_in_grid.x] = staged[t ^ 1] + 0.0f * total;\n"
    )
    x = rng.standard_normal(64).astype(np.float32)
    (out,) = emulate(spec(kernel), [x], launch((64, 1, 1), (32, 1, 1), [(64,)]))
    assert np.array_equal(out, x.reshape(32, 2)[:, ::-1].ravel())


def neighbour_read(tmp_path, flags: str):
    """A kernel whose threads read the output element their neighbour wrote, after a
    threadgroup_barrier with `flags`, and its call on 64 floats."""
    kernel = tmp_path / f"neighbour_{flags}.metal"
    kernel.write_text(
        "uint i = thread_position_in_grid.x;\n"
        "first[i] = inp[i];\n"
        f"threadgroup_barrier(mem_flags::{flags});\n"
        "second[i] = first[i ^ 1];\n"
    )
    x = rng.standard_normal(64).astype(np.float32)
    return x, (
        spec(kernel, outputs=("first", "second")),
        [x],
        launch((64, 1, 1), (64, 1, 1), [(64,), (64,)], [mx.float32] * 2),
    )


def test_device_barrier_orders_output_accesses(tmp_path):
    x, call = neighbour_read(tmp_path, "mem_device")
    _, second = emulate(*call)
    assert np.array_equal(second, x.reshape(32, 2)[:, ::-1].ravel())


def test_threadgroup_memory_barrier_leaves_output_accesses_unordered(tmp_path):
    _, call = neighbour_read(tmp_path, "mem_threadgroup")
    with pytest.raises(
        EmulatorError,
        match=(
            r"thread_index_in_threadgroup 0 .*data race on device output 'first' element 1 .*"
            r"reads it .*at neighbour_mem_threadgroup.metal:4 and thread_position_in_grid "
            r"\(1, 0, 0\) \(threadgroup \(0, 0, 0\), thread_index_in_threadgroup 1\) wrote it at "
            r"neighbour_mem_threadgroup.metal:2"
        ),
    ):
        emulate(*call)


def test_missing_simdgroup_barrier_is_a_race(tmp_path):
    """Lanes read a tile other lanes stored: without simdgroup_barrier they may run ahead."""
    source = (KERNELS / "matmul8.metal").read_text()
    barrier = "simdgroup_barrier(mem_flags::mem_threadgroup);\n"
    assert barrier in source
    broken = tmp_path / "matmul8_no_simdgroup_barrier.metal"
    broken.write_text(source.replace(barrier, ""))
    a, b = rng.standard_normal((2, 8, 8)).astype(np.float32)
    # lane 1 reads staged[1], which lane 0 stored (simdgroup_store's layout)
    with pytest.raises(
        EmulatorError,
        match=(
            r"lane 1\), forward thread order: data race on threadgroup array 'staged' element 1 "
            r".*reads it .*at matmul8_no_simdgroup_barrier.metal:17 and "
            r"thread_index_in_threadgroup 0 "
            r"\(simdgroup 0, lane 0\) wrote it at matmul8_no_simdgroup_barrier.metal:15, with no "
            r"threadgroup_barrier\(mem_threadgroup\), SIMD-group function or simdgroup_barrier"
        ),
    ):
        emulate(
            spec(broken, ("A", "B"), ("C",)),
            [a, b],
            launch((32, 1, 1), (32, 1, 1), [(8, 8)], template=[("M", 8), ("N", 8), ("K", 8)]),
        )


def test_generated_source_is_mlx_metal():
    x = np.zeros(64, np.float32)
    text = generated_source(
        EXP_SCALE,
        [mx.array(x), mx.array(1.0)],
        launch((64, 1, 1), (32, 1, 1), [(64,)], template=[("T", mx.float32)]),
    )
    assert "[[kernel]] void custom_kernel_exp_scale" in text
    assert "out[i] = T(metal::exp(float(inp[i])) * scale);" in text


def test_compile_cache_is_hit(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN35_MLX_EMULATOR_CACHE", str(tmp_path))
    monkeypatch.setattr(msl_emulator.build, "_loaded", {})
    x = rng.standard_normal(64).astype(np.float32)
    run = launch((64, 1, 1), (32, 1, 1), [(64,)], template=[("T", mx.float32)])
    before = msl_emulator.build.compiler_runs
    runtimes = msl_emulator.build.runtime_builds
    first = emulate(EXP_SCALE, [x, np.array(2.0, np.float32)], run)
    assert msl_emulator.build.compiler_runs == before + 1
    assert len(list(tmp_path.glob("*.so"))) == 1
    monkeypatch.setattr(msl_emulator.build, "_loaded", {})  # as a fresh process would start
    second = emulate(EXP_SCALE, [x, np.array(2.0, np.float32)], run)
    assert msl_emulator.build.compiler_runs == before + 1
    assert np.array_equal(first[0], second[0])
    # another kernel compiles on its own and links the runtime compiled for the first
    run_half = launch((64, 1, 1), (32, 1, 1), [(64,)], template=[("T", mx.float16)])
    emulate(EXP_SCALE, [x.astype(np.float16), np.array(2.0, np.float32)], run_half)
    assert msl_emulator.build.compiler_runs == before + 2
    assert msl_emulator.build.runtime_builds == runtimes + 1
    assert len(list(tmp_path.glob("*.so"))) == 2 and len(list(tmp_path.glob("*.o"))) == 1


# What Apple's Metal compiler refuses, the emulator refuses at compile time too: the kernel's line
# and the reason are in the error.
REFUSED = {
    "simdgroup_load_mismatched_type": (
        "simdgroup_load_mismatched_type.metal:4",
        r"simdgroup_load/simdgroup_store: the pointer's element type differs from the matrix's",
    ),
    "simdgroup_multiply_mismatched_type": (
        "simdgroup_multiply_mismatched_type.metal:6",
        r"deduced conflicting types for parameter .T. ",
    ),
    "double": ("double.metal:3", r"attempt to use (a )?poisoned"),
}


def run_on_one_simd_group(name: str, dtypes) -> np.ndarray:
    """`name` from the planted kernels on an 8x8 bfloat16 matrix, in one SIMD group."""
    inp = mx.array(rng.standard_normal(64).astype(np.float32)).astype(mx.bfloat16)
    (out,) = emulate(
        spec(PLANTED / f"{name}.metal"),
        [inp],
        launch((32, 1, 1), (32, 1, 1), [(64,)], dtypes),
    )
    return np.array(inp.astype(mx.float32)), out


@pytest.mark.parametrize(
    "name, line, message", [pytest.param(name, *item, id=name) for name, item in REFUSED.items()]
)
def test_what_metal_refuses_does_not_compile(name, line, message):
    with pytest.raises(EmulatorError, match=message) as caught:
        if name == "double":
            run_planted(name)
        else:
            run_on_one_simd_group(name, [mx.float32])
    assert "does not compile as C++ under the emulator" in str(caught.value)
    assert line in str(caught.value)


def test_simdgroup_load_of_converted_data_runs():
    x, out = run_on_one_simd_group("simdgroup_load_mismatched_type_fixed", [mx.float32])
    assert np.array_equal(out, x)


def test_simdgroup_multiply_of_one_element_type_runs():
    x, out = run_on_one_simd_group("simdgroup_multiply_mismatched_type_fixed", [mx.bfloat16])
    a = x.reshape(8, 8).astype(np.float64)
    assert relative_error(out.reshape(8, 8), a @ a) <= 1e-2
    assert np.array_equal(out, bf16(out))


def test_float_twin_of_double_runs():
    x = rng.standard_normal(64).astype(np.float32)
    (out,) = emulate(
        spec(PLANTED / "double_fixed.metal"), [x], launch((64, 1, 1), (32, 1, 1), [(64,)])
    )
    assert np.array_equal(out, 2 * x)


def test_mlx_utils_macros_are_defined():
    x = rng.standard_normal(64).astype(np.float32)
    (out,) = emulate(
        spec(KERNELS / "mlx_utils_macros.metal"), [x], launch((64, 1, 1), (32, 1, 1), [(64,)])
    )
    assert np.array_equal(out, 4 * x)
