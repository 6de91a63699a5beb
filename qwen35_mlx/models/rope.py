"""Partial rotary embedding of the full-attention layers (default and YaRN).

For text-only positions (T = H = W) Qwen3.5's interleaved M-RoPE is exactly 1-D RoPE on the
first `rotary_dim` dims with rotate-half pairs (i, i + rotary_dim/2); ARCHITECTURE.md §3.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .config import TextConfig


def inverse_frequencies(config: TextConfig) -> tuple[mx.array, float]:
    """Returns (inv_freq [rotary_dim/2] float32, attention scale on the rotated dims)."""
    rope, dim = config.rope, config.rotary_dim
    exponents = mx.arange(0, dim, 2, dtype=mx.float32) / dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    return _yarn(inv_freq, dim, config)


def _yarn(inv_freq: mx.array, dim: int, config: TextConfig) -> tuple[mx.array, float]:
    # YaRN as transformers' `_compute_yarn_parameters`: keep high frequencies, divide the
    # low ones by `factor`, blend linearly in between, and scale cos/sin by mscale.
    rope = config.rope

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the frequency stays as it is
    blended = inv_freq / rope.factor * (1 - keep) + inv_freq * keep
    scale = rope.attention_factor or (0.1 * math.log(rope.factor) + 1.0)
    return blended, float(scale)


class Rotary:
    """Applies the rotary embedding to [B, heads, T, head_dim] at a position offset."""

    def __init__(self, config: TextConfig):
        inv_freq, self.scale = inverse_frequencies(config)
        self.dims = config.rotary_dim
        self._periods = 1.0 / inv_freq  # mx.fast.rope takes periods, not inverse frequencies
        tail = config.head_dim - self.dims
        self._dim_scale = (None if self.scale == 1.0 else
                           mx.concatenate([mx.full((self.dims,), self.scale), mx.ones((tail,))]))

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self._dim_scale is not None:
            x = x * self._dim_scale.astype(x.dtype)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._periods)
