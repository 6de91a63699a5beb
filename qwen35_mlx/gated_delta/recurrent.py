"""Plain-MLX gated delta rule, one token at a time (docs/ARCHITECTURE.md §2.4 step 7).

Runs on every backend; it is the decode path and the reference the faster paths are tested
against. Layout follows mlx-lm and `mx.fast.gated_delta_update`: state is [B, Hv, Dv, Dk].
"""

from __future__ import annotations

import mlx.core as mx


def recurrent_step(
    q: mx.array,  # [B, Hv, Dk] float32, normalised and scaled
    k: mx.array,  # [B, Hv, Dk] float32, normalised
    v: mx.array,  # [B, Hv, Dv] float32
    decay: mx.array,  # [B, Hv] alpha = exp(g), in (0, 1]
    beta: mx.array,  # [B, Hv]
    state: mx.array,  # [B, Hv, Dv, Dk] float32
) -> tuple[mx.array, mx.array]:
    state = state * decay[..., None, None]
    remembered = (state * k[..., None, :]).sum(axis=-1)  # [B, Hv, Dv] = S^T k
    delta = (v - remembered) * beta[..., None]  # [B, Hv, Dv]
    state = state + delta[..., :, None] * k[..., None, :]  # S += k delta^T
    out = (state * q[..., None, :]).sum(axis=-1)  # [B, Hv, Dv] = S^T q
    return out, state


def recurrent_scan(
    q: mx.array,  # [B, T, Hv, Dk]
    k: mx.array,  # [B, T, Hv, Dk]
    v: mx.array,  # [B, T, Hv, Dv]
    g: mx.array,  # [B, T, Hv] log decay (<= 0)
    beta: mx.array,  # [B, T, Hv]
    state: mx.array,  # [B, Hv, Dv, Dk]
    all_states: bool = False,
) -> tuple[mx.array, mx.array]:
    """Scans T tokens; returns (out [B, T, Hv, Dv] float32, the final state, or with
    `all_states` the state after each token [B, T, Hv, Dv, Dk])."""
    decay = mx.exp(g)
    outs, states = [], []
    for t in range(q.shape[1]):
        out, state = recurrent_step(q[:, t], k[:, t], v[:, t], decay[:, t], beta[:, t], state)
        outs.append(out)
        states.append(state)
    return mx.stack(outs, axis=1), mx.stack(states, axis=1) if all_states else state
