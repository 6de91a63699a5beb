"""Every scan path against the float64 definition of the gated delta rule."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.gated_delta import SCAN_PATHS, chunked, gated_delta_update
from qwen35_mlx.gated_delta.chunked import unit_lower_inverse

from metrics import relative_error


def softplus(x):
    return np.logaddexp(0.0, x)


def gated_delta_reference(q, k, v, a, b, A_log, dt_bias, state=None):
    """docs/ARCHITECTURE.md §2.4 steps 5-7 in float64, one token at a time; state [B, Hv, Dk,
    Dv]."""
    q, k, v, a, b = (np.asarray(x, dtype=np.float64) for x in (q, k, v, a, b))
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    S = np.zeros((B, Hv, Dk, Dv)) if state is None else np.array(state, dtype=np.float64)
    beta = 1.0 / (1.0 + np.exp(-b))
    alpha = np.exp(-np.exp(np.float64(A_log)) * softplus(a + np.float64(dt_bias)))
    out = np.zeros((B, T, Hv, Dv))
    for bi, t, h in itertools.product(range(B), range(T), range(Hv)):
        kh = h // (Hv // Hk)
        qt = q[bi, t, kh] / np.sqrt(q[bi, t, kh] @ q[bi, t, kh] + 1e-6) / np.sqrt(Dk)
        kt = k[bi, t, kh] / np.sqrt(k[bi, t, kh] @ k[bi, t, kh] + 1e-6)
        S[bi, h] *= alpha[bi, t, h]
        delta = beta[bi, t, h] * (v[bi, t, h] - S[bi, h].T @ kt)
        S[bi, h] += np.outer(kt, delta)
        out[bi, t, h] = S[bi, h].T @ qt
    return out, S


def make_inputs(B, T, Hk, Hv, Dk, Dv, seed=0, with_state=False):
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=rng.normal(size=(B, T, Hk, Dk)),
        k=rng.normal(size=(B, T, Hk, Dk)),
        v=rng.normal(size=(B, T, Hv, Dv)),
        a=rng.normal(size=(B, T, Hv)),
        b=rng.normal(size=(B, T, Hv)),
        A_log=np.log(rng.uniform(1, 16, Hv)),
        dt_bias=rng.normal(size=Hv),
    )
    state = rng.normal(size=(B, Hv, Dk, Dv)) * 0.5 if with_state else None
    return {k: v.astype(np.float32) for k, v in arrays.items()}, state


# A covering set, not the full product: each T runs twice, the second case the complement of
# the first in batch, GQA ratio (Hv/Hk), head size and initial state, so every value of every
# factor meets every T. The small head size is not a power of two and has Dk != Dv (multiples
# of 8, which the Metal kernels tested with these cases need).
SMALL = (24, 16)
FIRST = {
    1: (1, 1, (128, 128), False),
    63: (1, 2, (128, 128), True),
    64: (2, 1, (128, 128), True),
    65: (2, 2, (128, 128), False),
    200: (1, 2, SMALL, False),
}


def complement(B, ratio, dims, with_state):
    return 3 - B, 3 - ratio, SMALL if dims != SMALL else (128, 128), not with_state


CASES = [
    dict(B=B, T=T, Hk=2, Hv=2 * ratio, Dk=dims[0], Dv=dims[1], with_state=state)
    for T, first in FIRST.items()
    for B, ratio, dims, state in (first, complement(*first))
]


def case_id(case):
    return (
        f"T{case['T']}-B{case['B']}-Hv{case['Hv']}/Hk{case['Hk']}-Dk{case['Dk']}-Dv{case['Dv']}"
        f"-{'state' if case['with_state'] else 'nostate'}"
    )


def run_path(path, inputs, state, dtype=mx.float32):
    args = {k: mx.array(v).astype(dtype if k in "qkvab" else mx.float32) for k, v in inputs.items()}
    mlx_state = None if state is None else mx.array(state.swapaxes(-1, -2).astype(np.float32))
    out, final = gated_delta_update(**args, state=mlx_state, path=path)
    assert final.dtype == mx.float32  # the state stays float32 whatever the inputs
    return np.array(out.astype(mx.float32)), np.array(final).swapaxes(-1, -2)


def rounded(inputs, dtype):
    """The inputs as the scan sees them: q, k, v, a, b rounded to `dtype`."""
    return {
        k: np.array(mx.array(v).astype(dtype).astype(mx.float32)) if k in "qkvab" else v
        for k, v in inputs.items()
    }


TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("path", sorted(SCAN_PATHS))
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_paths_match_definition(path, case, dtype):
    inputs, state = make_inputs(**case)
    out, final = run_path(path, inputs, state, getattr(mx, dtype))
    ref_out, ref_state = gated_delta_reference(**rounded(inputs, getattr(mx, dtype)), state=state)
    assert relative_error(out, ref_out) <= TOLERANCE[dtype]
    assert relative_error(final, ref_state) <= TOLERANCE[dtype]


@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_any_chunk_size_matches_definition(monkeypatch, chunk):
    # the default chunk is the device's (8 on CPU); the others must be exact too
    monkeypatch.setattr(chunked, "CPU_CHUNK", chunk)
    monkeypatch.setattr(chunked, "GPU_CHUNK", chunk)
    inputs, state = make_inputs(B=1, T=130, Hk=1, Hv=2, Dk=32, Dv=16, with_state=True)
    out, final = run_path("chunked", inputs, state)
    ref_out, ref_state = gated_delta_reference(**inputs, state=state)
    assert relative_error(out, ref_out) <= 1e-5
    assert relative_error(final, ref_state) <= 1e-5


@pytest.mark.parametrize("path", sorted(SCAN_PATHS))
def test_repeated_keys_stay_stable(path):
    # identical keys with beta near 1 and no decay: the worst case for the chunk solve
    inputs, _ = make_inputs(B=1, T=130, Hk=1, Hv=1, Dk=16, Dv=16)
    inputs["k"][:] = inputs["k"][:, :1]
    inputs["b"][:] = 8.0
    inputs["A_log"][:] = -30.0
    out, final = run_path(path, inputs, None)
    ref_out, ref_state = gated_delta_reference(**inputs)
    assert relative_error(out, ref_out) <= 1e-5 and relative_error(final, ref_state) <= 1e-5


def test_unit_lower_inverse_matches_numpy():
    rng = np.random.default_rng(0)
    x = np.tril(rng.normal(size=(3, 64, 64)), -1) * 0.3 + np.eye(64)
    ours = np.array(unit_lower_inverse(mx.array(x.astype(np.float32))))
    assert relative_error(ours, np.linalg.inv(x)) <= 1e-5


# MLX's built-in at the real head layouts (where Metal runs MLX's own kernel: Dk = Dv = 128,
# 16 key heads, 16 or 32 value heads): each T with two complementary (B, heads, dtype) triples,
# so every pair of factor values meets.
REAL_HEADS = {"0.8B": 16, "9B": 32}
MX_FAST_CASES = [
    (T, B, size, dtype)
    for T, first in {1: (1, "0.8B"), 7: (3, "0.8B"), 64: (3, "9B"), 200: (1, "9B")}.items()
    for B, size, dtype in (
        (first[0], first[1], "float32"),
        (4 - first[0], "9B" if first[1] == "0.8B" else "0.8B", "bfloat16"),
    )
]


@pytest.mark.parametrize("T, B, size, dtype", MX_FAST_CASES, ids=lambda x: str(x))
def test_mx_fast_at_the_real_head_layouts(T, B, size, dtype):
    inputs, state = make_inputs(B, T, 16, REAL_HEADS[size], 128, 128, seed=T, with_state=B == 3)
    out, final = run_path("mx_fast", inputs, state, getattr(mx, dtype))
    ref_out, ref_state = gated_delta_reference(**rounded(inputs, getattr(mx, dtype)), state=state)
    assert relative_error(out, ref_out) <= TOLERANCE[dtype]
    assert relative_error(final, ref_state) <= TOLERANCE[dtype]
