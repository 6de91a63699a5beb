"""Plain-MLX chunked gated delta rule for prefill (the WY/UT form, chunk 64).

The same maths as transformers' `torch_chunk_gated_delta_rule` and flash-linear-attention's
`chunk.py`: within a chunk of C tokens the recurrence is solved in parallel with one lower
triangular inverse, and only the state crosses chunk boundaries, so the sequential work is
T / C steps instead of T. State layout as the recurrent path: [B, Hv, Dv, Dk].
"""

from __future__ import annotations

import mlx.core as mx

CHUNK = 64


def unit_lower_inverse(x: mx.array) -> mx.array:
    """Inverse of unit lower-triangular matrices [..., n, n], n a power of two.

    Block elimination from 1x1 blocks up: inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1,
    D^-1]]. Exact like forward substitution, in log2(n) batched steps. (The power series
    (I + M)(I + M^2)... is shorter but its powers overflow float32 when keys repeat.)
    """
    *batch, n, _ = x.shape
    inverse = mx.ones((*batch, n, 1, 1), dtype=x.dtype)  # diagonal blocks, size 1
    size = 1
    while size < n:
        pairs = n // (2 * size)
        blocks = x.reshape(*batch, pairs, 2, size, pairs, 2, size)[..., :, 1, :, :, 0, :]
        lower_left = mx.moveaxis(mx.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [.., P, s, s]
        upper, lower = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        solved = -(lower @ lower_left @ upper)
        zeros = mx.zeros_like(upper)
        inverse = mx.concatenate([mx.concatenate([upper, zeros], axis=-1),
                                  mx.concatenate([solved, lower], axis=-1)], axis=-2)
        size *= 2
    return inverse.reshape(*batch, n, n)


def _to_chunks(x: mx.array, chunk: int) -> mx.array:
    """[B, T, H, ...] -> [B, H, N, chunk, ...], zero-padding T up to N * chunk."""
    B, T, H = x.shape[:3]
    pad = -T % chunk
    if pad:
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, (T + pad) // chunk, chunk, H, *x.shape[3:])
    return mx.moveaxis(x, 3, 1)


def chunked_scan(
    q: mx.array,  # [B, T, Hv, Dk] float32, normalised and scaled
    k: mx.array,  # [B, T, Hv, Dk] float32, normalised
    v: mx.array,  # [B, T, Hv, Dv] float32
    g: mx.array,  # [B, T, Hv] log decay (<= 0)
    beta: mx.array,  # [B, T, Hv]
    state: mx.array,  # [B, Hv, Dv, Dk]
    chunk: int = CHUNK,
) -> tuple[mx.array, mx.array]:
    """Scans T tokens; returns (out [B, T, Hv, Dv] float32, final state).

    Padded steps have k = 0, beta = 0 and g = 0, so they leave the state unchanged.
    """
    B, T, Hv, Dv = v.shape
    q, k, v = (_to_chunks(x, chunk) for x in (q, k, v))  # [B, Hv, N, C, D]
    g, beta = _to_chunks(g, chunk), _to_chunks(beta, chunk)  # [B, Hv, N, C]
    g_cum = mx.cumsum(g, axis=-1)
    causal = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    # decay from token j to token i (i >= j) within a chunk; masked before exp (no overflow)
    decay = mx.exp(mx.where(causal, g_cum[..., :, None] - g_cum[..., None, :], -mx.inf))
    k_beta = k * beta[..., None]
    strictly_lower = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_), k=-1)
    interactions = mx.where(strictly_lower, (k_beta @ k.swapaxes(-1, -2)) * decay, 0.0)
    solve = unit_lower_inverse(mx.eye(chunk) + interactions)  # (I + strict(beta K K^T))^-1
    u = solve @ (v * beta[..., None])  # [B, Hv, N, C, Dv] values after intra-chunk deltas
    w = solve @ (k_beta * mx.exp(g_cum)[..., None])  # [B, Hv, N, C, Dk] reads of the state
    scores = (q @ k.swapaxes(-1, -2)) * decay  # [B, Hv, N, C, C] intra-chunk attention
    q_decayed = q * mx.exp(g_cum)[..., None]
    k_to_end = k * mx.exp(g_cum[..., -1:] - g_cum)[..., None]  # decay to the chunk's end
    chunk_decay = mx.exp(g_cum[..., -1])  # [B, Hv, N]

    state_kv = state.swapaxes(-1, -2)  # [B, Hv, Dk, Dv]
    outs = []
    for n in range(q.shape[2]):
        v_new = u[:, :, n] - w[:, :, n] @ state_kv  # [B, Hv, C, Dv]
        outs.append(q_decayed[:, :, n] @ state_kv + scores[:, :, n] @ v_new)
        state_kv = (state_kv * chunk_decay[:, :, n, None, None]
                    + k_to_end[:, :, n].swapaxes(-1, -2) @ v_new)
    out = mx.stack(outs, axis=2).reshape(B, Hv, -1, Dv)[:, :, :T]  # [B, Hv, T, Dv]
    return out.swapaxes(1, 2), state_kv.swapaxes(-1, -2)
