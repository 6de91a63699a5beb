"""The Metal kernels, run by the MSL-on-CPU emulator, against the float64 definition and the
plain-MLX paths; planted bugs in them must be caught."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from qwen35_mlx.bench.count import decode_primitive_counts, primitive_counts
from qwen35_mlx.gated_delta import dispatch as gated_delta
from qwen35_mlx.gated_delta.chunked import chunked_scan
from qwen35_mlx.gated_delta.chunked_kernel import CHUNKED_SCAN, chunked_scan_call
from qwen35_mlx.gated_delta.decode_step import DECODE_STEP, decode_step, decode_step_call
from qwen35_mlx.gated_delta.dispatch import scan_inputs
from qwen35_mlx.gated_delta.kernel import KernelSpec
from qwen35_mlx.models.config import LINEAR, TextConfig
from qwen35_mlx.models.text import GatedDeltaNet

from metrics import relative_error
from msl_emulator import EmulatorError, emulate, run_on_emulator
from test_gated_delta import CASES, case_id, gated_delta_reference, make_inputs

TOLERANCE = {mx.float32: 1e-5, mx.bfloat16: 1e-2}
HEADS = {"0.8B": (16, 16), "9B": (16, 32)}  # (Hk, Hv) with Dk = Dv = 128


def broken_copy(spec, tmp_path, correct: str, broken: str):
    """`spec` with one snippet of its source replaced (a planted bug)."""
    assert spec.source.count(correct) == 1, "the snippet to break is not in the kernel any more"
    path = tmp_path / f"broken_{spec.source_file}"
    path.write_text(spec.source.replace(correct, broken))
    return dataclasses.replace(spec, name=f"{spec.name}_broken", source_file=str(path))


# ---- chunked prefill kernel ----


def scan_case(inputs, state, dtype):
    """Scan inputs as `gated_delta_update` prepares them, and the state in [B, Hv, Dv, Dk]."""
    args = {k: mx.array(v).astype(dtype if k in "qkvab" else mx.float32) for k, v in inputs.items()}
    B, _, Hv, Dv = args["v"].shape
    q, k, g, beta = scan_inputs(
        args["q"], args["k"], args["a"], args["b"], args["A_log"], args["dt_bias"], Hv
    )
    Dk = q.shape[-1]
    start = (
        mx.zeros((B, Hv, Dv, Dk))
        if state is None
        else mx.array(state.swapaxes(-1, -2).astype(np.float32))
    )
    return (q, k, args["v"].astype(mx.float32), g, beta, start)


def emulate_chunked(spec, scan_args):
    kernel_inputs, launch = chunked_scan_call(*scan_args)
    return emulate(spec, kernel_inputs, launch)  # out, state


def rounded(inputs, dtype):
    """The inputs as the kernel sees them after the cast to `dtype`."""
    return {
        k: np.array(mx.array(v).astype(dtype).astype(mx.float32)) if k in "qkvab" else v
        for k, v in inputs.items()
    }


# every case in float32; bfloat16 inputs at T = 1 and 65; then the real head counts, a covering
# set of size x dtype x B in {1, 3} x T in {1, 7, 64, 200} (all of them: test_msl_strict.py)
CHUNKED_CASES = (
    [(case, mx.float32) for case in CASES]
    + [(case, mx.bfloat16) for case in CASES if case["T"] in (1, 65)]
    + [
        (
            dict(B=B, T=T, Hk=HEADS[model][0], Hv=HEADS[model][1], Dk=128, Dv=128, with_state=True),
            dtype,
        )
        for model, B, T, dtype in (
            ("0.8B", 1, 7, mx.float32),
            ("0.8B", 3, 1, mx.bfloat16),
            ("9B", 3, 7, mx.bfloat16),
            ("9B", 1, 64, mx.float32),
            ("0.8B", 3, 200, mx.float32),
            ("9B", 1, 200, mx.bfloat16),
        )
    ]
)


@pytest.mark.parametrize(
    "case, dtype",
    CHUNKED_CASES,
    ids=[f"{case_id(c)}-{'float32' if d == mx.float32 else 'bfloat16'}" for c, d in CHUNKED_CASES],
)
def test_chunked_kernel_matches_definition_and_plain_path(case, dtype):
    inputs, state = make_inputs(**case)
    scan_args = scan_case(inputs, state, dtype)
    out, final = emulate_chunked(CHUNKED_SCAN, scan_args)
    ref_out, ref_state = gated_delta_reference(**rounded(inputs, dtype), state=state)
    assert relative_error(out, ref_out) <= TOLERANCE[dtype]
    assert relative_error(final.swapaxes(-1, -2), ref_state) <= TOLERANCE[dtype]
    plain_out, plain_state = chunked_scan(*scan_args)
    assert relative_error(out, plain_out) <= 1e-5
    assert relative_error(final, plain_state) <= 1e-5


def test_chunked_kernel_repeated_keys_stay_stable():
    # identical keys with beta near 1 and no decay: the worst case for the chunk solve
    inputs, _ = make_inputs(B=1, T=130, Hk=1, Hv=1, Dk=16, Dv=16)
    inputs["k"][:] = inputs["k"][:, :1]
    inputs["b"][:] = 8.0
    inputs["A_log"][:] = -30.0
    out, final = emulate_chunked(CHUNKED_SCAN, scan_case(inputs, None, mx.float32))
    ref_out, ref_state = gated_delta_reference(**inputs)
    assert relative_error(out, ref_out) <= 1e-5
    assert relative_error(final.swapaxes(-1, -2), ref_state) <= 1e-5


def test_chunked_kernel_missing_barrier_is_caught(tmp_path):
    # drop the barrier after A and P are built: simdgroups then read tiles of A that others are
    # still writing
    built = "    store_tile(qk, P + 8 * ib * LC + 8 * jb, LC, false, lane);\n  }\n"
    spec = broken_copy(
        CHUNKED_SCAN,
        tmp_path,
        built + "  threadgroup_barrier(mem_flags::mem_threadgroup);\n",
        built,
    )
    inputs, state = make_inputs(B=1, T=40, Hk=1, Hv=1, Dk=16, Dv=16, with_state=True)
    with pytest.raises(EmulatorError, match="data race on threadgroup array 'A'"):
        emulate_chunked(spec, scan_case(inputs, state, mx.float32))


def test_chunked_kernel_missing_barrier_at_chunk_end_is_caught(tmp_path):
    # drop the barrier that closes a chunk: the next chunk's staging overwrites k while another
    # simdgroup still reads it for its state update. The race detector names both lines: the
    # read is load_tile's first load in chunked_scan.h (lane 0 moves element 0 first)
    closing = (
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n\n  for (int e = tid; e < live * BV;"
    )
    spec = broken_copy(CHUNKED_SCAN, tmp_path, closing, closing.split("\n")[-1])
    lines = spec.source.splitlines()
    staged = lines.index("    ks[i * LK + d] = i < live ? static_cast<float>(k[src]) : 0.0f;") + 1
    header = spec.header.splitlines()
    read = header.index("  const float first = src[at.first];") + 1
    inputs, state = make_inputs(B=1, T=40, Hk=1, Hv=1, Dk=16, Dv=16, with_state=True)
    with pytest.raises(
        EmulatorError,
        match=(
            rf"simdgroup 0, lane 0\).*data race on threadgroup array 'ks' element 0 .*"
            rf"this thread writes it at broken_chunked_scan.metal:{staged} and "
            rf"thread_index_in_threadgroup 32 \(simdgroup 1, lane 0\) read it at "
            rf"chunked_scan.h:{read}, in another SIMD group"
        ),
    ):
        emulate_chunked(spec, scan_case(inputs, state, mx.float32))


# ---- fused decode step ----

# (B, Hk, Hv, Dk, Dv, dtype, with_state): both models' heads in both dtypes at B = 1 and 3, which
# split each head over 4 (0.8B, B = 1), 2 or 1 (9B, B = 3) threadgroups, and small heads with
# Dk != Dv, not powers of two
DECODE_CASES = [
    (B, *HEADS[model], 128, 128, dtype, True)
    for model in HEADS
    for dtype in (mx.float32, mx.bfloat16)
    for B in (1, 3)
] + [
    (2, 2, 4, 16, 24, mx.float32, False),
    (1, 2, 4, 16, 24, mx.bfloat16, True),
    (16, 1, 4, 16, 24, mx.bfloat16, True),
]


def decode_id(case):
    B, Hk, Hv, Dk, Dv, dtype, with_state = case
    return (
        f"B{B}-Hv{Hv}/Hk{Hk}-Dk{Dk}-Dv{Dv}-{'float32' if dtype == mx.float32 else 'bfloat16'}"
        f"-{'state' if with_state else 'nostate'}"
    )


def make_layer(Hk, Hv, Dk, Dv, dtype, seed=0):
    """A DeltaNet layer with random weights in `dtype`, A_log and norm weight in float32 as
    the loader keeps them."""
    config = TextConfig(
        vocab_size=16,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=Hk,
        linear_num_value_heads=Hv,
        linear_key_head_dim=Dk,
        linear_value_head_dim=Dv,
        linear_conv_kernel_dim=4,
        layer_types=(LINEAR,),
    )
    layer = GatedDeltaNet(config)
    mx.random.seed(seed)
    layer.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.3, layer.parameters()))
    layer.set_dtype(dtype)
    layer.A_log = mx.log(mx.random.uniform(1, 16, (Hv,)))
    layer.norm.weight = 1.0 + 0.1 * mx.random.normal((Dv,))
    mx.eval(layer.parameters())
    return layer


def decode_definition(qkv, z, a, b, layer, conv_state, state):
    """The layer between its projections and out_proj in float64, from the same (rounded)
    projections: conv + SiLU, the gated delta rule (test_gated_delta), gated RMSNorm."""
    f64 = lambda x: np.array(x.astype(mx.float32), dtype=np.float64)
    B, _, Hv, Dv = z.shape
    Hk, Dk = layer.Hk, layer.Dk
    padded = np.concatenate([f64(conv_state), f64(qkv)], axis=1)  # [B, K, C]
    weight = f64(layer.conv1d.weight)[..., 0]  # [C, K]
    conv = np.einsum("bkc,ck->bc", padded, weight)[:, None]  # [B, 1, C]
    mixed = conv / (1 + np.exp(-conv))
    q = mixed[..., : Hk * Dk].reshape(B, 1, Hk, Dk)
    k = mixed[..., Hk * Dk : 2 * Hk * Dk].reshape(B, 1, Hk, Dk)
    v = mixed[..., 2 * Hk * Dk :].reshape(B, 1, Hv, Dv)
    out, new_state = gated_delta_reference(
        q, k, v, f64(a), f64(b), f64(layer.A_log), f64(layer.dt_bias), f64(state).swapaxes(-1, -2)
    )
    normed = out / np.sqrt((out**2).mean(axis=-1, keepdims=True) + layer.norm.eps)
    gate = f64(z)
    y = normed * f64(layer.norm.weight) * gate / (1 + np.exp(-gate))
    return y.reshape(B, 1, Hv * Dv), new_state.swapaxes(-1, -2), padded[:, 1:]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[decode_id(c) for c in DECODE_CASES])
def test_decode_step_matches_definition_and_plain_layer(case, monkeypatch):
    monkeypatch.setattr(KernelSpec, "run", run_on_emulator)
    B, Hk, Hv, Dk, Dv, dtype, with_state = case
    layer = make_layer(Hk, Hv, Dk, Dv, dtype)
    x = mx.random.normal((B, 1, 64)).astype(dtype)
    channels = layer.conv1d.weight.shape[0]
    conv_state = mx.random.normal((B, 3, channels)).astype(dtype)
    state = mx.random.normal((B, Hv, Dv, Dk)) * 0.5 if with_state else mx.zeros((B, Hv, Dv, Dk))

    qkv, z = layer.in_proj_qkv(x), layer.in_proj_z(x).reshape(B, 1, Hv, Dv)
    a, b = layer.in_proj_a(x), layer.in_proj_b(x)
    kernel_inputs, launch = decode_step_call(
        qkv,
        z,
        a,
        b,
        layer.conv1d.weight,
        layer.A_log,
        layer.dt_bias,
        layer.norm.weight,
        layer.norm.eps,
        conv_state,
        state,
        Hk,
    )
    outputs = decode_step(kernel_inputs, launch)
    y, new_state, new_conv_state = (np.array(x.astype(mx.float32)) for x in outputs)

    tolerance = TOLERANCE[dtype]
    for ours, reference in zip(
        (y, new_state, new_conv_state), decode_definition(qkv, z, a, b, layer, conv_state, state)
    ):
        assert relative_error(ours, reference) <= tolerance

    layer.decode_path = "plain"
    cache = [conv_state, state]
    plain_out = layer(x, cache)
    fused_out = layer.out_proj(mx.array(y).astype(dtype))
    assert relative_error(fused_out.astype(mx.float32), plain_out.astype(mx.float32)) <= tolerance
    assert relative_error(new_state, cache[1]) <= tolerance
    assert relative_error(new_conv_state, cache[0].astype(mx.float32)) == 0.0  # a shift, exact


def test_layer_decodes_through_the_fused_step_like_the_plain_layer(monkeypatch):
    """Four tokens from an empty cache, each through GatedDeltaNet's fused path (the kernel run
    by the emulator) and its plain path: outputs and caches agree at every step. Float32: from a
    near-empty state some heads' outputs are tiny, and the gated RMSNorm scales their bfloat16
    rounding up to ~50% on both paths alike (bfloat16 is checked on random states above)."""
    monkeypatch.setattr(KernelSpec, "run", run_on_emulator)
    layer = make_layer(2, 4, 16, 24, mx.float32)
    tokens = mx.random.normal((2, 4, 64))
    fused_cache, plain_cache = [None, None], [None, None]
    for t in range(tokens.shape[1]):
        layer.decode_path = "fused"
        fused = layer(tokens[:, t : t + 1], fused_cache)
        layer.decode_path = "plain"
        plain = layer(tokens[:, t : t + 1], plain_cache)
        assert relative_error(fused, plain) <= 1e-5
        assert relative_error(fused_cache[1], plain_cache[1]) <= 1e-5
        assert relative_error(fused_cache[0], plain_cache[0]) == 0.0


def test_decode_step_out_of_bounds_read_is_caught(tmp_path):
    # read a whole 32-lane row of the state when Dk = 16: past the buffer's end on its last row
    spec = broken_copy(
        DECODE_STEP,
        tmp_path,
        "s[r][i] = row < ROWS && d < Dk ? s_in[d] : 0.0f;",
        "s[r][i] = s_in[d];",
    )
    layer = make_layer(1, 1, 16, 16, mx.float32)
    x = mx.random.normal((1, 1, 64))
    qkv, z = layer.in_proj_qkv(x), layer.in_proj_z(x).reshape(1, 1, 1, 16)
    kernel_inputs, launch = decode_step_call(
        qkv,
        z,
        layer.in_proj_a(x),
        layer.in_proj_b(x),
        layer.conv1d.weight,
        layer.A_log,
        layer.dt_bias,
        layer.norm.weight,
        layer.norm.eps,
        mx.zeros((1, 3, 48)),
        mx.zeros((1, 1, 16, 16)),
        1,
    )
    with pytest.raises(EmulatorError, match="state_in"):
        emulate(spec, kernel_inputs, launch)


def test_layer_decodes_in_one_kernel_when_fused():
    # 16 x 4 heads fill the GPU: one dispatch; 1 x 4 are split over 4 threadgroups each and the
    # gated norm follows in a second dispatch
    layer = make_layer(2, 4, 16, 16, mx.bfloat16)
    fused = decode_primitive_counts(layer, "fused", batch=16)
    plain = decode_primitive_counts(layer, "plain", batch=16)
    # the projections (Matmul with its Transpose / Flatten / Unflatten) and z's Reshape remain
    assert fused["CustomKernel"] == 1
    assert set(fused) == {"CustomKernel", "Matmul", "Transpose", "Flatten", "Unflatten", "Reshape"}
    assert sum(fused.values()) < sum(plain.values())
    assert "CustomKernel" not in plain
    split = decode_primitive_counts(layer, "fused", batch=1)
    assert split["CustomKernel"] == 2
    assert sum(split.values()) < sum(decode_primitive_counts(layer, "plain", batch=1).values())


def test_dispatcher_picks_the_kernels_on_metal(monkeypatch):
    monkeypatch.setattr(gated_delta, "metal_ready", lambda: True)
    assert gated_delta.use_fused_decode(1) and not gated_delta.use_fused_decode(2)

    def kernels(Dk):
        inputs, _ = make_inputs(B=1, T=5, Hk=1, Hv=1, Dk=Dk, Dv=16)
        args = [mx.array(inputs[n]) for n in ("q", "k", "v", "a", "b", "A_log", "dt_bias")]
        return primitive_counts(gated_delta.gated_delta_update, *args)["CustomKernel"]

    assert kernels(16) == 1  # the whole scan in one dispatch
    assert kernels(12) == 0  # Dk not a multiple of 8: the plain chunked form
