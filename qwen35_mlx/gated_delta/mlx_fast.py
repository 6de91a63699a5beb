"""MLX's built-in scan, `mx.fast.gated_delta_update`, as a scan path beside ours.

It computes the same recurrence (docs/ARCHITECTURE.md §2.4 step 7) with the same state layout,
[B, Hv, Dv, Dk], and no normalisation of its own: q and k arrive normalised and q scaled, as
`scan_inputs` prepares them for every path. Its one difference is the decay, taken in linear
space (gamma = alpha = exp(g)) where the other paths take the log decay g.

Per MLX's Metal source (read, never run here), its kernel takes only Dk = Dv = 128, a few (Hk,
Hv) head counts, 16/16 and 32/32 among them (the layouts the 0.8B-9B heads have once
`scan_inputs` has repeated the key heads), and no mask; other shapes, and the CPU, fall back to
a per-token loop of MLX ops. Handing it the key heads unrepeated (it maps value head j to key
head j // (Hv / Hk) itself) would save the repeat; every path takes them repeated for now.
"""

from __future__ import annotations

import mlx.core as mx


def mlx_fast_scan(
    q: mx.array,  # [B, T, Hv, Dk] float32, normalised and scaled
    k: mx.array,  # [B, T, Hv, Dk] float32, normalised
    v: mx.array,  # [B, T, Hv, Dv] float32
    g: mx.array,  # [B, T, Hv] log decay (<= 0)
    beta: mx.array,  # [B, T, Hv]
    state: mx.array,  # [B, Hv, Dv, Dk] float32
) -> tuple[mx.array, mx.array]:
    """Scans T tokens; returns (out [B, T, Hv, Dv] float32, final state)."""
    out, state = mx.fast.gated_delta_update(q, k, v, mx.exp(g), beta, state)
    return out, state
