"""Scaled dot-product attention of the full-attention layers, with bounded memory.

Two paths, one dispatcher (`pick_path`):
- "fast": `mx.fast.scaled_dot_product_attention`. MLX fuses it (no [heads, queries, keys]
  scores in memory) only on a GPU stream and only for some head dims. In MLX 0.32
  (mlx/backend/metal/scaled_dot_product_attention.cpp, `has_fused_kernel` and
  `ScaledDotProductAttention::use_fallback`): more than 8 queries use the fused "full" kernel
  for head dims {64, 72, 80, 96, 128} (192 and 256 are routed to the unfused fallback, except
  with a causal mask, >= 1024 queries and NAX hardware); at most 8 queries use the fused
  "vector" kernel for {64, 96, 128, 192, 256} when queries x GQA factor <= 32. On the CPU
  (mlx/backend/no_gpu/primitives.cpp) there is no fused kernel at all: the fallback in
  mlx/fast.cpp builds the full float scores with a matmul and a softmax.
- "blocked": keys in blocks of `BLOCK_SIZE` with an online softmax (running max, running sum
  and accumulator in float32, flash-attention style) and queries in blocks of `QUERY_BLOCK`,
  so that the scores in memory are at most [B, Hq, QUERY_BLOCK, BLOCK_SIZE] whatever the
  prompt. Causal blocks above the diagonal are skipped.

Qwen3.5's head dim is 256, so prefill (more than 8 queries) materialises the scores on every
backend but NAX Metal; "blocked" takes over there once the scores would exceed
`BLOCKED_MIN_SCORES` per head. Keys and values quantized by `QuantizedKVCache` always go
through the blocked loop, with `mx.quantized_matmul` on each block, never dequantized whole.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

PATHS = ("fast", "blocked")
BLOCK_SIZE = 512  # keys per block
QUERY_BLOCK = 2048  # queries per block (generate's prefill step: one block per chunk)
# Above this many scores per head (Tq * Tk: 8 MB in float32, 2048 queries x 1024 keys) the
# unfused path's scores outweigh the blocked loop's per-block overhead; decoding (Tq = 1)
# stays on the fast path up to 2M keys.
BLOCKED_MIN_SCORES = 1 << 21
FULL_KERNEL_HEAD_DIMS = (64, 72, 80, 96, 128)  # > 8 queries, fused and chosen by MLX
VECTOR_KERNEL_HEAD_DIMS = (64, 96, 128, 192, 256)  # <= 8 queries

Quantized = tuple[mx.array, mx.array, mx.array]  # (packed uint32, scales, biases) per row


def has_fused_kernel(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether MLX runs a fused kernel (no score matrix) for these shapes here."""
    if not (mx.default_device() == mx.gpu and mx.metal.is_available()):
        return False
    return metal_fuses(q, k, v)


def metal_fuses(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether MLX's Metal back end runs a fused kernel for these shapes."""
    num_queries, head_dim = q.shape[2], q.shape[3]
    if head_dim != v.shape[3]:
        return False
    if num_queries > 8:
        return head_dim in FULL_KERNEL_HEAD_DIMS
    gqa_factor = q.shape[1] // k.shape[1]
    return head_dim in VECTOR_KERNEL_HEAD_DIMS and num_queries * gqa_factor <= 32


forced_path: str | None = None  # one of PATHS for every call (benchmarks), None: dispatch


def pick_path(q: mx.array, k: mx.array, v: mx.array) -> str:
    """ "fast" where MLX fuses or the scores are small, else "blocked"."""
    if forced_path is not None:
        return forced_path
    if has_fused_kernel(q, k, v) or q.shape[2] * k.shape[2] <= BLOCKED_MIN_SCORES:
        return "fast"
    return "blocked"


def scaled_dot_product_attention(
    q: mx.array,
    k,
    v,
    scale: float,
    mask: str | None = None,
    quantization: tuple[int, int] | None = None,
) -> mx.array:
    """softmax(q kᵀ · scale) v over keys [B, Hkv, Tk, D], queries [B, Hq, Tq, D].

    mask: None (every query sees every key) or "causal" (query i sits at position
    Tk - Tq + i and sees keys 0..its own position). quantization: (group_size, bits) when k
    and v are `mx.quantize`d tuples.
    """
    if not (mask is None or (isinstance(mask, str) and mask == "causal")):
        raise ValueError(f"mask must be None or 'causal', got {mask!r}")
    causal = mask == "causal"
    if quantization is not None:
        group_size, bits = quantization
        return quantized_attention(q, k, v, scale, causal, group_size, bits)
    if pick_path(q, k, v) == "fast":
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return blocked_attention(q, k, v, scale, causal)


def blocked_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    causal: bool,
    block_size: int = BLOCK_SIZE,
    query_block: int = QUERY_BLOCK,
) -> mx.array:
    """Float keys and values [B, Hkv, Tk, D]; returns [B, Hq, Tq, D] in q's dtype."""

    def block_scores(queries, start, end):  # queries [B, Hkv, rep, tq, D] float32
        keys = k[:, :, None, start:end].astype(mx.float32)  # [B, Hkv, 1, blk, D]
        return queries @ keys.swapaxes(-1, -2)  # [B, Hkv, rep, tq, blk]

    def block_values(probs, start, end):  # probs [B, Hkv, rep, tq, blk]
        return probs @ v[:, :, None, start:end].astype(mx.float32)  # [B, Hkv, rep, tq, D]

    return _attend_in_blocks(
        q,
        k.shape[1],
        k.shape[2],
        scale,
        causal,
        block_scores,
        block_values,
        block_size,
        query_block,
    )


def quantized_attention(
    q: mx.array,
    k: Quantized,
    v: Quantized,
    scale: float,
    causal: bool,
    group_size: int,
    bits: int,
    block_size: int = BLOCK_SIZE,
    query_block: int = QUERY_BLOCK,
) -> mx.array:
    """Keys and values as (packed, scales, biases) of [B, Hkv, Tk, D]; q [B, Hq, Tq, D].

    Scales and biases are cast to float32 per block so that the products stay float32.
    """
    num_kv_heads, num_keys = k[0].shape[1], k[0].shape[2]
    if q.shape[2] * num_keys <= BLOCKED_MIN_SCORES:
        block_size = query_block = max(num_keys, 1)  # small: one block, fewer ops

    def block(quantized, start, end):  # each [B, Hkv, 1, blk, ...]
        packed, scales, biases = (a[:, :, None, start:end] for a in quantized)
        return packed, scales.astype(mx.float32), biases.astype(mx.float32)

    def block_scores(queries, start, end):
        return mx.quantized_matmul(
            queries, *block(k, start, end), transpose=True, group_size=group_size, bits=bits
        )  # [B, Hkv, rep, tq, blk]

    def block_values(probs, start, end):
        return mx.quantized_matmul(
            probs, *block(v, start, end), transpose=False, group_size=group_size, bits=bits
        )  # [B, Hkv, rep, tq, D]

    return _attend_in_blocks(
        q,
        num_kv_heads,
        num_keys,
        scale,
        causal,
        block_scores,
        block_values,
        block_size,
        query_block,
    )


BlockFn = Callable[[mx.array, int, int], mx.array]


def _attend_in_blocks(
    q: mx.array,
    num_kv_heads: int,
    num_keys: int,
    scale: float,
    causal: bool,
    block_scores: BlockFn,
    block_values: BlockFn,
    block_size: int,
    query_block: int,
) -> mx.array:
    B, num_heads, num_queries, head_dim = q.shape
    repeats = num_heads // num_kv_heads
    # grouped heads share their key head: no copy of the keys per query head
    queries = (q.astype(mx.float32) * scale).reshape(
        B, num_kv_heads, repeats, num_queries, head_dim
    )  # [B, Hkv, rep, Tq, D]
    first_position = num_keys - num_queries  # of query 0 (the cache offset)
    outputs = []
    for q_start in range(0, num_queries, query_block):
        q_end = min(q_start + query_block, num_queries)
        # causal: keys after this block's last query are never seen
        key_end = first_position + q_end if causal else num_keys
        out = _online_softmax(
            queries[:, :, :, q_start:q_end],
            first_position + q_start if causal else None,
            key_end,
            block_scores,
            block_values,
            block_size,
        )
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=3)
    return out.reshape(B, num_heads, num_queries, -1).astype(q.dtype)


def _online_softmax(
    queries: mx.array,
    first_position: int | None,
    key_end: int,
    block_scores: BlockFn,
    block_values: BlockFn,
    block_size: int,
) -> mx.array:
    """Queries [B, Hkv, rep, tq, D] (scaled, float32) against keys 0..key_end-1.

    first_position: of query 0 when causal (query i sees keys 0..first_position + i), else
    None. The running max starts from the first block, where every query sees key 0, so no
    row is ever all -inf.
    """
    if first_position is not None:
        positions = mx.arange(first_position, first_position + queries.shape[3])  # [tq]
    running_max = running_sum = accumulator = None
    for start in range(0, key_end, block_size):
        end = min(start + block_size, key_end)
        scores = block_scores(queries, start, end)  # [B, Hkv, rep, tq, blk]
        if first_position is not None and end - 1 > first_position:  # crosses the diagonal
            visible = positions[:, None] >= mx.arange(start, end)[None]  # [tq, blk]
            scores = mx.where(visible, scores, -mx.inf)
        block_max = scores.max(axis=-1, keepdims=True)  # [B, Hkv, rep, tq, 1]
        new_max = block_max if running_max is None else mx.maximum(running_max, block_max)
        probs = mx.exp(scores - new_max)
        block_out = block_values(probs, start, end)  # [B, Hkv, rep, tq, D]
        if running_max is None:
            running_sum = probs.sum(axis=-1, keepdims=True)
            accumulator = block_out
        else:
            correction = mx.exp(running_max - new_max)  # rescales what came before
            running_sum = running_sum * correction + probs.sum(axis=-1, keepdims=True)
            accumulator = accumulator * correction + block_out
        running_max = new_max
    return accumulator / running_sum
