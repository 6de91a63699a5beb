"""The fused Gated DeltaNet decode step (`decode_step.metal`): one dispatch per layer and token.

From the layer's raw projections of one token it computes what the plain layer does between
its input projections and `out_proj` (conv + SiLU, q/k norms, decay and beta, the delta rule, the
gated RMSNorm), returning the normed output, the new state and the new conv state.
"""

from __future__ import annotations

import mlx.core as mx

from .kernel import KernelSpec, Launch

DECODE_STEP = KernelSpec(
    name="qwen35_gated_delta_decode_step",
    source_file="decode_step.metal",
    input_names=(
        "qkv",
        "z",
        "a",
        "b",
        "conv_state",
        "conv_weight",
        "A_log",
        "dt_bias",
        "norm_weight",
        "state_in",
        "norm_eps",
    ),
    output_names=("y", "state_out", "conv_state_out"),
)

MAX_SIMDGROUPS = 16  # 512 threads: 8 state rows per simdgroup at Dv = 128


def decode_step_launch(
    B: int, Hk: int, Hv: int, Dk: int, Dv: int, K: int, dtype: mx.Dtype
) -> Launch:
    """One threadgroup per (batch, value head), simdgroups over the Dv state rows."""
    simdgroups = min(MAX_SIMDGROUPS, Dv)
    channels = 2 * Hk * Dk + Hv * Dv
    return Launch(
        template=(
            ("InT", dtype),
            ("Dk", Dk),
            ("Dv", Dv),
            ("Hk", Hk),
            ("Hv", Hv),
            ("K", K),
            ("SG", simdgroups),
        ),
        grid=(32, simdgroups, B * Hv),
        threadgroup=(32, simdgroups, 1),
        output_shapes=((B, 1, Hv * Dv), (B, Hv, Dv, Dk), (B, K - 1, channels)),
        output_dtypes=(dtype, mx.float32, dtype),
    )


def decode_step_call(
    qkv: mx.array,  # [B, 1, C] raw projection, C = 2 * Hk * Dk + Hv * Dv
    z: mx.array,  # [B, 1, Hv, Dv]
    a: mx.array,  # [B, 1, Hv]
    b: mx.array,  # [B, 1, Hv]
    conv_weight: mx.array,  # [C, K, 1]
    A_log: mx.array,  # [Hv]
    dt_bias: mx.array,  # [Hv]
    norm_weight: mx.array,  # [Dv]
    norm_eps: float,
    conv_state: mx.array,  # [B, K-1, C]
    state: mx.array,  # [B, Hv, Dv, Dk] float32
    key_heads: int,
) -> tuple[list, Launch]:
    """The kernel's inputs (in `DECODE_STEP.input_names` order) and launch for one token."""
    B, T, Hv, Dv = z.shape
    channels, K = conv_weight.shape[:2]
    Dk = state.shape[-1]
    if T != 1 or K < 2 or channels != 2 * key_heads * Dk + Hv * Dv or Hv % key_heads:
        raise ValueError(
            f"the fused decode step takes one token with conv taps K >= 2 and qkv channels "
            f"2 * Hk * Dk + Hv * Dv; got T={T}, K={K}, channels={channels}, Hk={key_heads}, "
            f"Hv={Hv}, Dk={Dk}, Dv={Dv}: use the plain path (decode path 'plain')"
        )
    inputs = [
        qkv,
        z,
        a,
        b,
        conv_state.astype(qkv.dtype),
        conv_weight,
        A_log,
        dt_bias,
        norm_weight,
        state.astype(mx.float32),
        mx.array(norm_eps, dtype=mx.float32),
    ]
    return inputs, decode_step_launch(B, key_heads, Hv, Dk, Dv, K, qkv.dtype)
