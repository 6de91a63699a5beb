"""The one entry point the model calls for the Gated DeltaNet scan.

`gated_delta_update` turns the layer's raw projections into the scan inputs (ARCHITECTURE.md
§2.4 steps 5-6, in float32 as transformers does) and hands them to a scan path chosen by
`pick_path`: the per-token recurrence for decode, the chunked form for prefill. Both are plain
MLX and run on every backend; custom kernels register in `SCAN_PATHS` beside them, each
tested against the float64 definition in tests/.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .chunked import chunked_scan
from .recurrent import recurrent_scan

ScanFn = Callable[..., tuple[mx.array, mx.array]]

SCAN_PATHS: dict[str, ScanFn] = {"recurrent": recurrent_scan, "chunked": chunked_scan}

L2_EPS = 1e-6  # added to sum(x^2), as transformers' / fla's l2norm


# Measured on the MLX CPU backend, one layer with the 0.8B heads (16 x 128 x 128 state), best
# of 3 in one run: per-token loop / chunked = 0.021 / 0.109 s at T = 16, 0.076 / 0.107 s at 64,
# 0.137 / 0.104 s at 128, 0.478 / 0.368 s at 512. The loop also keeps every step's 1 MiB state
# alive until evaluation (peak 79 MB at T = 64, 558 MB at 512; chunked 13 and 65 MB).
CHUNKED_MIN_TOKENS = 128


def pick_path(num_tokens: int) -> str:
    """The scan path for this call on the default device."""
    return "chunked" if num_tokens >= CHUNKED_MIN_TOKENS else "recurrent"


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
        a.astype(mx.float32) + dt_bias.astype(mx.float32))  # [B, T, Hv] log decay, <= 0
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
) -> tuple[mx.array, mx.array]:
    """Gated delta rule over T tokens. Returns (out [B, T, Hv, Dv] in v's dtype, state)."""
    B, T, Hv, Dv = v.shape
    if state is None:
        state = mx.zeros((B, Hv, Dv, q.shape[-1]), dtype=mx.float32)
    path = path or pick_path(T)
    if path not in SCAN_PATHS:
        raise ValueError(f"unknown gated delta path {path!r}; choose one of {sorted(SCAN_PATHS)}")
    q, k, g, beta = scan_inputs(q, k, a, b, A_log, dt_bias, Hv)
    out, state = SCAN_PATHS[path](q, k, v.astype(mx.float32), g, beta, state)
    return out.astype(v.dtype), state
