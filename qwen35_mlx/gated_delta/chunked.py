"""Plain-MLX chunked gated delta rule for prefill (the WY/UT form).

The same maths as transformers' `torch_chunk_gated_delta_rule` and flash-linear-attention's
`chunk.py`: within a chunk of C tokens the recurrence is solved in parallel with one lower
triangular inverse, and only the state crosses chunk boundaries. Everything that does not
depend on the state is computed for all chunks at once as batched matmuls over [N, B, H]
(`chunk_terms`); the sequential pass (`state_pass`) is then one matmul reading the state and
two matmul-adds per chunk. State layout as the recurrent path: [B, Hv, Dv, Dk].

Per token and head the work is 6 Dk Dv multiply-adds for the state (read it into the outputs
and into the values, write the update) plus ~10 C D inside the chunk, so a smaller chunk does
fewer FLOPs but more sequential steps. On MLX's CPU backend, whose matmul (reference BLAS) runs
at ~4 GFLOP/s, FLOPs decide: a chunk of 8 measured fastest (see CPU_CHUNK).
"""

from __future__ import annotations

import mlx.core as mx

# Measured on the MLX CPU backend, one layer from bf16 projections, B = 1, Dk = Dv = 128, best
# of 3 CPU seconds in one run: chunk 8 / 16 / 32 = 1.32 / 1.49 / 1.58 s at T = 2048 with 16
# heads, 2.82 / 3.01 / 3.83 s with 32; 0.30 / 0.30 / 0.42 s at T = 512 with 16 heads.
CPU_CHUNK = 8
# On Metal a custom kernel normally takes prefill; where none applies, fla's and transformers'
# chunk: fewer sequential steps matter more than FLOPs on a GPU (not measured here).
GPU_CHUNK = 64


def default_chunk(num_tokens: int) -> int:
    """The device's chunk, or the power of two >= num_tokens when that is smaller."""
    chunk = CPU_CHUNK if mx.default_device() == mx.cpu else GPU_CHUNK
    return min(chunk, 1 << (num_tokens - 1).bit_length())


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
        inverse = mx.concatenate(
            [mx.concatenate([upper, zeros], axis=-1), mx.concatenate([solved, lower], axis=-1)],
            axis=-2,
        )
        size *= 2
    return inverse.reshape(*batch, n, n)


def _to_chunks(x: mx.array, chunk: int) -> mx.array:
    """[B, T, H, ...] -> [N, B, H, chunk, ...], zero-padding T up to N * chunk.

    Chunk-major, so that each step of the state pass reads one contiguous block.
    """
    B, T, H = x.shape[:3]
    pad = -T % chunk
    if pad:
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, (T + pad) // chunk, chunk, H, *x.shape[3:])  # [B, N, C, H, ...]
    return mx.moveaxis(mx.moveaxis(x, 1, 0), 3, 2)


def chunk_terms(q, k, v, g, beta):
    """The state-independent part of every chunk: q, k [N, B, H, C, Dk], v [.., C, Dv],
    g, beta [N, B, H, C] -> (reads, u, scores, k_to_end, chunk_decay)."""
    C = g.shape[-1]
    g_cum = mx.cumsum(g, axis=-1)  # log decay from the chunk's start to each token
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    # decay from token j to token i (i >= j), 0 above the diagonal; masked before exp
    decay = mx.exp(mx.where(causal, g_cum[..., :, None] - g_cum[..., None, :], -mx.inf))
    k_beta = k * beta[..., None]
    k_t = k.swapaxes(-1, -2)  # [N, B, H, Dk, C]
    strictly_lower = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)
    interactions = mx.where(strictly_lower, (k_beta @ k_t) * decay, 0.0)
    solve = unit_lower_inverse(mx.eye(C) + interactions)  # (I + strict(beta K K^T))^-1
    decay_in = mx.exp(g_cum)[..., None]  # [N, B, H, C, 1] from the chunk's start
    w = solve @ (k_beta * decay_in)  # [N, B, H, C, Dk] how each token reads the state
    u = solve @ (v * beta[..., None])  # [N, B, H, C, Dv] values after intra-chunk deltas
    reads = mx.concatenate([q * decay_in, w], axis=-2)  # [N, B, H, 2C, Dk]: one matmul per step
    scores = (q @ k_t) * decay  # [N, B, H, C, C] intra-chunk attention
    k_to_end = k * mx.exp(g_cum[..., -1:] - g_cum)[..., None]  # decayed to the chunk's end
    chunk_decay = mx.exp(g_cum[..., -1])[..., None, None]  # [N, B, H, 1, 1]
    return reads, u, scores, k_to_end, chunk_decay


def state_pass(reads, u, scores, k_to_end, chunk_decay, state_kv):
    """The sequential part, chunk by chunk; state_kv [B, H, Dk, Dv].

    Returns (out [N, B, H, C, Dv], final state_kv)."""
    C = u.shape[-2]
    outs = []
    for n in range(u.shape[0]):
        read = reads[n] @ state_kv  # [B, H, 2C, Dv]: q S (outputs) and w S (values)
        v_new = u[n] - read[..., C:, :]  # [B, H, C, Dv]
        outs.append(mx.addmm(read[..., :C, :], scores[n], v_new))
        state_kv = mx.addmm(state_kv * chunk_decay[n], k_to_end[n].swapaxes(-1, -2), v_new)
    return mx.stack(outs), state_kv


def chunked_scan(
    q: mx.array,  # [B, T, Hv, Dk] float32, normalised and scaled
    k: mx.array,  # [B, T, Hv, Dk] float32, normalised
    v: mx.array,  # [B, T, Hv, Dv] float32
    g: mx.array,  # [B, T, Hv] log decay (<= 0)
    beta: mx.array,  # [B, T, Hv]
    state: mx.array,  # [B, Hv, Dv, Dk]
    chunk: int | None = None,  # a power of two; default: `default_chunk(T)`
) -> tuple[mx.array, mx.array]:
    """Scans T tokens; returns (out [B, T, Hv, Dv] float32, final state).

    Padded steps have k = 0, beta = 0 and g = 0, so they leave the state unchanged.
    """
    B, T, Hv, Dv = v.shape
    chunk = chunk or default_chunk(T)
    terms = chunk_terms(*(_to_chunks(x, chunk) for x in (q, k, v, g, beta)))
    out, state_kv = state_pass(*terms, state.swapaxes(-1, -2))
    out = mx.moveaxis(out, 0, 1).swapaxes(2, 3)  # [B, N, C, Hv, Dv]
    return out.reshape(B, -1, Hv, Dv)[:, :T], state_kv.swapaxes(-1, -2)
