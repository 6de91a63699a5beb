"""Partial rotary embedding of the full-attention layers (default and YaRN), interleaved M-RoPE.

Positions have three rows (T, H, W); rotary frequency i takes its position from H when
i % 3 == 1 and i < 3 * mrope_section[1], from W when i % 3 == 2 and i < 3 * mrope_section[2],
else from T (docs/ARCHITECTURE.md §3). For text positions (T = H = W) this is exactly 1-D RoPE on
the first `rotary_dim` dims with rotate-half pairs (i, i + rotary_dim/2): the fast path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import mlx.core as mx

from .config import TextConfig

if TYPE_CHECKING:  # numpy is imported where it is used: it costs ~0.2 s at start-up
    import numpy as np


def inverse_frequencies(config: TextConfig) -> tuple[mx.array, float]:
    """Returns (inv_freq [rotary_dim/2] float32, attention scale on the rotated dims)."""
    rope, dim = config.rope, config.rotary_dim
    exponents = mx.arange(0, dim, 2, dtype=mx.float32) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    return _yarn(inv_freq, dim, config)


def _yarn(inv_freq: mx.array, dim: int, config: TextConfig) -> tuple[mx.array, float]:
    # YaRN as transformers' `_compute_yarn_parameters`: keep high frequencies, divide the
    # low ones by `factor`, blend linearly in between, and scale cos/sin by mscale.
    rope = config.rope

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

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


def rotate_half(x: mx.array) -> mx.array:
    """[a, b] -> [-b, a] over the last axis: pairs (i, i + d/2) rotate together."""
    first, second = mx.split(x, 2, axis=-1)
    return mx.concatenate([-second, first], axis=-1)


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x rotated in float32 by angles given as cos/sin (broadcast against x), in x's dtype."""
    x32 = x.astype(mx.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def mrope_axes(mrope_section: tuple[int, ...], frequencies: int) -> np.ndarray:
    """Which position row (0 T, 1 H, 2 W) drives each rotary frequency: THWTHW...TT."""
    import numpy as np

    i = np.arange(frequencies)
    axes = np.zeros(frequencies, dtype=np.int32)
    axes[(i % 3 == 1) & (i < 3 * mrope_section[1])] = 1
    axes[(i % 3 == 2) & (i < 3 * mrope_section[2])] = 2
    return axes


class Rotary:
    """Applies the rotary embedding to q and k [B, heads, T, head_dim]: at a position offset
    (text), or at M-RoPE position ids [3, B, T] (prompts with images or videos)."""

    def __init__(self, config: TextConfig):
        inv_freq, self.scale = inverse_frequencies(config)
        self.dims = config.rotary_dim
        self._inv_freq = inv_freq
        self._periods = 1.0 / inv_freq  # mx.fast.rope takes periods, not inverse frequencies
        self._axes = mx.array(mrope_axes(config.rope.mrope_section, self.dims // 2))
        tail = config.head_dim - self.dims
        self._dim_scale = (
            None
            if self.scale == 1.0
            else mx.concatenate([mx.full((self.dims,), self.scale), mx.ones((tail,))])
        )
        # computed now: a lazy array can only be evaluated on the thread that built it, and
        # the model must serve any thread
        mx.eval(self._inv_freq, self._periods, self._axes, self._dim_scale)

    def __call__(
        self,
        q: mx.array,
        k: mx.array,
        offset: int | mx.array = 0,
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """q, k rotated. offset: int or [B] (position of the first token); position_ids
        [3, B, T] instead."""
        if position_ids is not None:
            cos, sin = self._mrope_angles(position_ids)
            return self._rotate_part(q, cos, sin), self._rotate_part(k, cos, sin)
        return self._rope(q, offset), self._rope(k, offset)

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        if self._dim_scale is not None:
            x = x * self._dim_scale.astype(x.dtype)
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )

    def _mrope_angles(self, position_ids: mx.array) -> tuple[mx.array, mx.array]:
        """cos, sin [B, 1, T, rotary_dim] of M-RoPE positions [3, B, T]."""
        positions = position_ids[self._axes].astype(mx.float32)  # [rd/2, B, T], row per freq
        angles = positions.transpose(1, 2, 0) * self._inv_freq  # [B, T, rd/2]
        angles = mx.concatenate([angles, angles], axis=-1)[:, None]  # [B, 1, T, rd]
        # the YaRN attention scale multiplies cos/sin, as transformers does
        return mx.cos(angles) * self.scale, mx.sin(angles) * self.scale

    def _rotate_part(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """The first rotary_dim dims of x rotated, the rest as they are."""
        rotated = rotate(x[..., : self.dims], cos, sin)
        return mx.concatenate([rotated, x[..., self.dims :]], axis=-1)
