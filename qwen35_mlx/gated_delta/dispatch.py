"""The one entry point the model calls for the Gated DeltaNet scan.

`gated_delta_update` turns the layer's raw projections into the scan inputs (docs/ARCHITECTURE.md
§2.4 steps 5-6, in float32 as transformers does) and hands them to a scan path chosen by
`pick_path`: on Metal the path this machine's self-test found fastest and correct for the length
(autotune.py; before any self-test the chunked kernel, chunked_scan.metal); elsewhere the
plain-MLX per-token recurrence for short inputs and the chunked form for prefill. On Metal a
DeltaNet layer decodes one token with `gated_delta_decode` instead (decode_step.metal: conv to
gated norm in one dispatch) unless the self-test disabled it or found the plain ops faster.
Every path is tested against the float64 definition in tests/, the Metal kernels under the
MSL-on-CPU emulator there.

`SCAN_PATHS` holds the paths that run on this machine. Any path, Metal ones included, can be
forced by name (`path=`, `decode_path=`): off Metal a forced kernel cannot run, but it traces
under `mx.export_function`, which is how its primitives are counted (count.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from . import chunked_kernel
from .chunked import chunked_scan
from .decode_step import DECODE_STEP, decode_step_call
from .mlx_fast import mlx_fast_scan
from .recurrent import recurrent_scan
from .tuning import UNTUNED, Tuning, cache_file, machine, read_tuning

ScanFn = Callable[..., tuple[mx.array, mx.array]]

# the paths that run on every backend (MLX's built-in falls back to MLX ops off Metal)
PLAIN_PATHS: dict[str, ScanFn] = {
    "recurrent": recurrent_scan,
    "chunked": chunked_scan,
    "mx_fast": mlx_fast_scan,
}
METAL_PATHS: dict[str, ScanFn] = {"metal_chunked": chunked_kernel.metal_chunked_scan}
SCAN_PATHS = {**PLAIN_PATHS, **(METAL_PATHS if mx.metal.is_available() else {})}
DECODE_PATHS = ("fused", "plain")  # the fused Metal step, or the layer's own ops

L2_EPS = 1e-6  # added to sum(x^2), as transformers' / fla's l2norm


# Measured on the MLX CPU backend, one layer from bf16 projections, B = 1, best of 7 CPU
# seconds in one run: per-token loop / chunked = 4.2 / 4.7 ms at T = 4, 8.8 / 8.0 ms at 8,
# 16.1 / 11.3 ms at 16, 69 / 37 ms at 64 with the 0.8B heads (16 x 128 x 128 state); 9.7 / 8.3,
# 18.0 / 14.7 ms at T = 4, 8 with the 9B heads (32 value heads). The loop also keeps every
# step's state alive until evaluation.
CHUNKED_MIN_TOKENS = 8


def metal_ready() -> bool:
    """Whether Metal kernels run here: the default device is a GPU of the Metal back end."""
    return mx.default_device() == mx.gpu and mx.metal.is_available()


_tuning: Tuning | None = None  # read once per process, then looked up


def machine_tuning() -> Tuning:
    """The Metal paths' choice recorded for this machine (docs/ARCHITECTURE.md §8.1), or the
    kernels as designed where none is."""
    global _tuning
    if _tuning is None:
        _tuning = read_tuning(cache_file(), machine()) or UNTUNED
    return _tuning


def use_tuning(tuning: Tuning | None) -> None:
    """Makes the dispatcher follow `tuning` (None: the cached one, read again on next use)."""
    global _tuning
    _tuning = tuning


def pick_path(num_tokens: int) -> str:
    """The scan path for this call on the default device."""
    if metal_ready():
        return machine_tuning().scan_path(num_tokens)
    return "chunked" if num_tokens >= CHUNKED_MIN_TOKENS else "recurrent"


def use_fused_decode(num_tokens: int, decode_path: str | None = None) -> bool:
    """Whether a DeltaNet layer calls `gated_delta_decode`: as forced, else one token on Metal
    where the self-test kept the fused step."""
    if decode_path is None:
        return num_tokens == 1 and metal_ready() and machine_tuning().decode == "fused"
    if decode_path not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {decode_path!r}; choose one of {DECODE_PATHS}")
    return decode_path == "fused"


def l2_normalize(x: mx.array, scale: float = 1.0) -> mx.array:
    """scale * x / sqrt(sum(x^2) + eps) in one fused op (rms_norm adds eps to the *mean*)."""
    dim = x.shape[-1]
    return mx.fast.rms_norm(x, None, L2_EPS / dim) * (scale / dim**0.5)


def scan_inputs(q, k, a, b, A_log, dt_bias, value_heads: int):
    """q, k [B, T, Hk, Dk] and a, b [B, T, Hv] -> float32 scan inputs with heads repeated."""
    q = l2_normalize(q.astype(mx.float32), scale=q.shape[-1] ** -0.5)
    k = l2_normalize(k.astype(mx.float32))
    if (repeat := value_heads // q.shape[2]) > 1:  # v-head j reads q/k head j // repeat
        q, k = mx.repeat(q, repeat, axis=2), mx.repeat(k, repeat, axis=2)
    g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(
        a.astype(mx.float32) + dt_bias.astype(mx.float32)
    )  # [B, T, Hv] log decay, <= 0
    beta = mx.sigmoid(b.astype(mx.float32))
    return q, k, g, beta


def gated_delta_update(
    q: mx.array,  # [B, T, Hk, Dk] after the causal conv
    k: mx.array,  # [B, T, Hk, Dk]
    v: mx.array,  # [B, T, Hv, Dv]
    a: mx.array,  # [B, T, Hv] decay input
    b: mx.array,  # [B, T, Hv] beta logits
    A_log: mx.array,  # [Hv]
    dt_bias: mx.array,  # [Hv]
    state: mx.array | None = None,  # [B, Hv, Dv, Dk] float32
    path: str | None = None,
    all_states: bool = False,
) -> tuple[mx.array, mx.array]:
    """Gated delta rule over T tokens. Returns (out [B, T, Hv, Dv] in v's dtype, state), or
    with `all_states` the state after each token [B, T, Hv, Dv, Dk] (from the per-token
    recurrence: speculative decoding keeps the state after the last accepted token)."""
    B, T, Hv, Dv = v.shape
    if state is None:
        state = mx.zeros((B, Hv, Dv, q.shape[-1]), dtype=mx.float32)
    if all_states:  # only the per-token recurrence has every token's state
        scan = functools.partial(recurrent_scan, all_states=True)
    else:
        if path is None:
            path = pick_path(T)
            if path in METAL_PATHS and not chunked_kernel.supports(q.shape[-1], Dv):
                path = "chunked"
        paths = {**PLAIN_PATHS, **METAL_PATHS}
        if path not in paths:
            raise ValueError(f"unknown gated delta path {path!r}; choose one of {sorted(paths)}")
        scan = paths[path]
    q, k, g, beta = scan_inputs(q, k, a, b, A_log, dt_bias, Hv)
    out, state = scan(q, k, v.astype(mx.float32), g, beta, state)
    return out.astype(v.dtype), state


def gated_delta_decode(
    qkv: mx.array,  # [B, 1, C] the token's raw projection, C = 2 * Hk * Dk + Hv * Dv
    z: mx.array,  # [B, 1, Hv, Dv]
    a: mx.array,  # [B, 1, Hv]
    b: mx.array,  # [B, 1, Hv]
    conv_weight: mx.array,  # [C, K, 1]
    A_log: mx.array,  # [Hv]
    dt_bias: mx.array,  # [Hv]
    norm_weight: mx.array,  # [Dv]
    norm_eps: float,
    conv_state: mx.array | None,  # [B, K-1, C]
    state: mx.array | None,  # [B, Hv, Dv, Dk] float32
    key_heads: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """One DeltaNet token from projections to gated norm in one Metal dispatch.

    Returns (y [B, 1, Hv * Dv] in qkv's dtype, ready for out_proj; state; conv_state).
    """
    B, _, Hv, Dv = z.shape
    channels, K = conv_weight.shape[:2]
    if conv_state is None:
        conv_state = mx.zeros((B, K - 1, channels), dtype=qkv.dtype)
    if state is None:
        Dk = (channels - Hv * Dv) // (2 * key_heads)
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    inputs, launch = decode_step_call(
        qkv,
        z,
        a,
        b,
        conv_weight,
        A_log,
        dt_bias,
        norm_weight,
        norm_eps,
        conv_state,
        state,
        key_heads,
    )
    y, state, conv_state = DECODE_STEP.run(inputs, launch)
    return y, state, conv_state
