"""The fused Gated DeltaNet decode step (`decode_step.metal`, `gated_norm.metal`).

From the layer's raw projections of one token it computes what the plain layer does between
its input projections and `out_proj` (conv + SiLU, q/k norms, decay and beta, the delta rule, the
gated RMSNorm), returning the normed output, the new state and the new conv state. One dispatch
when batch x value heads fill the GPU; else the heads' state rows are split over more
threadgroups and a second, small dispatch applies the gated RMSNorm, which needs whole heads.
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
    output_names=("out", "state_out", "conv_state_out"),
    header_file="gated_norm.h",
)
GATED_NORM = KernelSpec(
    name="qwen35_gated_delta_gated_norm",
    source_file="gated_norm.metal",
    input_names=("o", "z", "norm_weight", "norm_eps"),
    output_names=("y",),
    header_file="gated_norm.h",
)

MAX_SIMDGROUPS = 16  # 512 threads: 8 state rows per simdgroup at Dv = 128
# Threadgroups a decode step should launch to keep a Pro / Max chip's GPU cores busy (one
# threadgroup runs on one core); fewer (batch x value heads) are made up by splitting heads.
MIN_THREADGROUPS = 64
# At most this many threadgroups per head: each one convolves and normalises the whole q and k
# (2 Dk channels), re-reading their conv weights and state (docs/ARCHITECTURE.md §8: at 0.8B,
# B = 1, split 4, 1.13x the layer state's read + write in bytes requested, 1.04x in distinct
# bytes, the repeats being the same 4.6 KB for a head's threadgroups).
MAX_SPLIT = 4


def head_split(B: int, Hv: int, Dv: int) -> int:
    """Threadgroups per (batch, value head): the fewest, a power of two dividing Dv, that give
    MIN_THREADGROUPS, at most MAX_SPLIT."""
    split = 1
    while split < MAX_SPLIT and B * Hv * split < MIN_THREADGROUPS and Dv % (2 * split) == 0:
        split *= 2
    return split


def decode_step_launch(
    B: int, Hk: int, Hv: int, Dk: int, Dv: int, K: int, dtype: mx.Dtype
) -> Launch:
    """`head_split` threadgroups per (batch, value head), simdgroups over their state rows."""
    split = head_split(B, Hv, Dv)
    simdgroups = min(MAX_SIMDGROUPS, Dv // split)
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
            ("SPLIT", split),
        ),
        grid=(32, simdgroups * split, B * Hv),
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


def gated_norm_launch(B: int, Hv: int, Dv: int, dtype: mx.Dtype) -> Launch:
    """One simdgroup per (batch, value head)."""
    return Launch(
        template=(("InT", dtype), ("Dv", Dv)),
        grid=(32, 1, B * Hv),
        threadgroup=(32, 1, 1),
        output_shapes=((B, 1, Hv * Dv),),
        output_dtypes=(dtype,),
    )


def decode_step(inputs: list, launch: Launch) -> tuple[mx.array, mx.array, mx.array]:
    """Runs the step (inputs and launch from `decode_step_call`) -> (y [B, 1, Hv * Dv], state,
    conv_state); a split step's scan output goes through `GATED_NORM`."""
    out, state, conv_state = DECODE_STEP.run(inputs, launch)
    if dict(launch.template)["SPLIT"] > 1:
        named = dict(zip(DECODE_STEP.input_names, inputs))
        B, _, Hv, Dv = named["z"].shape
        norm_inputs = [out.reshape(B, Hv, Dv), *(named[k] for k in GATED_NORM.input_names[1:])]
        (out,) = GATED_NORM.run(norm_inputs, gated_norm_launch(B, Hv, Dv, out.dtype))
    return out, state, conv_state
