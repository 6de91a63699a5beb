"""The strict compile check (tests/msl_strict): every kernel and launch configuration compiles as
Apple's Metal compiler would take it, and planted kernels with what Metal rejects fail it."""

from pathlib import Path

import mlx.core as mx
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
    decode_step_launch,
    gated_norm_launch,
)
from qwen35_mlx.gated_delta.kernel import KernelSpec, Launch

import msl_strict.check
from msl_strict import StrictError, strict_check

KERNELS = Path(__file__).parent / "msl_strict"
PLANTED = KERNELS / "planted"
HEADS = {"0.8B": (16, 16), "9B": (16, 32)}  # (Hk, Hv); Dk = Dv = 128, conv taps K = 4
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
Dk = Dv = 128
K = 4


def decode_step_inputs(B, Hk, Hv, dtype):
    channels = 2 * Hk * Dk + Hv * Dv
    activation = lambda *shape: mx.zeros(shape, dtype)
    return [
        activation(B, 1, channels),  # qkv
        activation(B, 1, Hv, Dv),  # z
        activation(B, 1, Hv),  # a
        activation(B, 1, Hv),  # b
        activation(B, K - 1, channels),  # conv_state
        activation(channels, K, 1),  # conv_weight
        mx.zeros((Hv,)),  # A_log
        mx.zeros((Hv,)),  # dt_bias
        mx.zeros((Dv,)),  # norm_weight
        mx.zeros((B, Hv, Dv, Dk)),  # state_in
        mx.array(1e-6),  # norm_eps
    ]


@pytest.mark.parametrize("B", [1, 3], ids=lambda B: f"B{B}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", HEADS, ids=str)
def test_decode_step_compiles_strictly(model, dtype, B):
    Hk, Hv = HEADS[model]
    inputs = decode_step_inputs(B, Hk, Hv, DTYPES[dtype])
    launch = decode_step_launch(B, Hk, Hv, Dk, Dv, K, DTYPES[dtype])
    strict_check(DECODE_STEP, inputs, launch)
    if dict(launch.template)["SPLIT"] > 1:  # the gated norm runs as its own kernel
        z, norm_weight, norm_eps = inputs[1], inputs[8], inputs[10]
        norm_inputs = [mx.zeros((B, Hv, Dv), DTYPES[dtype]), z, norm_weight, norm_eps]
        strict_check(GATED_NORM, norm_inputs, gated_norm_launch(B, Hv, Dv, DTYPES[dtype]))


@pytest.mark.parametrize("T", [1, 7, 64, 200], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("B", [1, 3], ids=lambda B: f"B{B}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", HEADS, ids=str)
def test_chunked_scan_compiles_strictly(model, dtype, B, T):
    # both launches of metal_chunked_scan. The dispatcher passes v in float32; the scan reads
    # any dtype, so both are checked
    _, Hv = HEADS[model]
    scan = lambda D, dtype=mx.float32: mx.zeros((B, T, Hv, D), dtype)
    gate = mx.zeros((B, T, Hv))
    prepare_inputs, prepare = chunk_prepare_call(
        scan(Dk), scan(Dk), gate, gate, chunk_length(Dk, Dv)
    )
    strict_check(CHUNK_PREPARE, prepare_inputs, prepare)
    W, P, gc = (mx.zeros(shape) for shape in prepare.output_shapes)
    inputs, launch = chunked_scan_call(
        scan(Dk), scan(Dk), scan(Dv, DTYPES[dtype]), W, P, gc, mx.zeros((B, Hv, Dv, Dk))
    )
    strict_check(CHUNKED_SCAN, inputs, launch)


def planted(name: str, folder: Path = PLANTED) -> KernelSpec:
    """A toy kernel on `inp` and `out`, with its helper functions when a `.h` is beside it."""
    header = folder / f"{name}.h"
    return KernelSpec(
        name,
        str(folder / f"{name}.metal"),
        ("inp",),
        ("out",),
        header_file=str(header) if header.exists() else None,
    )


def check_planted(name: str, dtype=mx.float32, folder: Path = PLANTED) -> None:
    launch = Launch((("T", dtype),), (32, 1, 1), (32, 1, 1), ((64,),), (mx.float32,))
    strict_check(planted(name, folder), [mx.zeros((64,), dtype)], launch)


PLANTED_BUGS = {  # kernel: (what the error must say, input dtype)
    "double": (r"use of type 'double' requires cl_khr_fp64", mx.float32),
    "lambda": (r"lambda expression", mx.float32),
    "recursion": (r"recursive call: sum_to -> sum_to", mx.float32),
    "threadgroup_to_device_pointer": (
        r"cannot initialize a variable of type '__global float \*.*' with an .*'__local float",
        mx.float32,
    ),
    "simdgroup_load_mismatched_type": (
        r"no matching function for call to 'simdgroup_load'(.|\n)*"
        r"conflicting types for parameter 'T' \('float' vs. 'bfloat16_t'",
        mx.bfloat16,
    ),
}


@pytest.mark.parametrize("name", PLANTED_BUGS)
def test_planted_kernel_fails_strictly(name):
    message, dtype = PLANTED_BUGS[name]
    with pytest.raises(StrictError, match=message):
        check_planted(name, dtype)


@pytest.mark.parametrize("name", PLANTED_BUGS)
def test_correct_twin_of_planted_kernel_passes(name):
    check_planted(f"{name}_fixed", PLANTED_BUGS[name][1])


def test_results_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN35_MLX_STRICT_CACHE", str(tmp_path))
    runs = msl_strict.check.compiler_runs
    check_planted("double_fixed")
    check_planted("double_fixed")
    assert msl_strict.check.compiler_runs == runs + 1
    with pytest.raises(StrictError, match="double"):
        check_planted("double")
    with pytest.raises(StrictError, match="double"):
        check_planted("double")  # a failure is cached too
    assert msl_strict.check.compiler_runs == runs + 2


def test_errors_name_the_metal_line():
    with pytest.raises(StrictError, match=r"double\.metal:3:1: error"):
        check_planted("double")


def test_mlx_utils_macros_compile():
    check_planted("mlx_utils_macros", folder=KERNELS)
