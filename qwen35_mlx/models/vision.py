"""Qwen3.5 vision tower: a pre-LN ViT over 16-px patches, then a 2x2 patch merger.

Maths from transformers' `Qwen3_5VisionModel` (the oracle of tests/test_vision.py) and
docs/ARCHITECTURE.md §4. The module tree keeps Hugging Face's names under `vision_tower.*`, the
layout mlx-vlm also uses; the Conv3d patch weight is held channels-last [O, Tp, P, P, C] as
mlx-vlm holds it (`loading.hf_to_mlx` transposes a Hugging Face checkpoint once).

Patches arrive in the processor's order: per temporal group, the 2x2 merge blocks row by row,
the 4 patches of a block consecutive. Everything computed per patch here (learned positions,
rotary angles) follows that order, and the merger concatenates each run of 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig
from .rope import rotate

if TYPE_CHECKING:  # numpy is imported where it is used: it costs ~0.2 s at start-up
    import numpy as np

Grid = tuple[int, int, int]  # (t, h, w) in patches: temporal groups, rows, columns


def as_grids(grid_thw, merge: int) -> list[Grid]:
    """[n, 3] (array or nested sequence) -> validated (t, h, w) tuples of Python ints."""
    import numpy as np

    grids = [tuple(int(v) for v in row) for row in np.asarray(grid_thw).reshape(-1, 3)]
    for t, h, w in grids:
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise ValueError(
                f"grid_thw ({t}, {h}, {w}) is not valid: t, h, w must be positive and h, w "
                f"multiples of spatial_merge_size {merge}; use the grids the processor returns"
            )
    return grids


def merge_block_coordinates(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) [h*w] of the patches of one frame in merge-block order."""
    import numpy as np

    shape = (h // merge, merge, w // merge, merge)  # [block row, r, block col, c]
    rows = np.broadcast_to(np.arange(h).reshape(h // merge, merge, 1, 1), shape)
    cols = np.broadcast_to(np.arange(w).reshape(1, 1, w // merge, merge), shape)
    return rows.transpose(0, 2, 1, 3).ravel(), cols.transpose(0, 2, 1, 3).ravel()


def bilinear_taps(coords: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two source taps [n, 2] and their weights [n, 2] resampling a `side`-long axis to `size`
    points with align_corners=True (end points on end points), taps clamped at the edge."""
    import numpy as np

    src = coords.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor[:, None].astype(np.int64) + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
    return taps, weights.astype(np.float32)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        # holds weight [O, Tp, P, P, C] and bias [O] under mlx-vlm's names
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel)

    def __call__(self, pixels: mx.array) -> mx.array:
        # A Conv3d whose kernel equals its stride and the patch is one matmul; the processor
        # flattens each patch as (C, Tp, P, P), so the kernel is flattened the same way.
        weight = self.proj.weight
        kernel = weight.moveaxis(-1, 1).reshape(weight.shape[0], -1)  # [O, C*Tp*P*P]
        return mx.addmm(self.proj.bias, pixels.astype(kernel.dtype), kernel.T)  # [N, O]


class VisionAttention(nn.Module):
    """Non-causal attention with 2-D rotary, each temporal group attending only to itself."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def frame_heads(self, part: mx.array, groups: int, length: int) -> mx.array:
        """[groups * length, nh, d] -> [groups, nh, length, d]: each frame attends alone."""
        return part.reshape(groups, length, self.n_heads, -1).transpose(0, 2, 1, 3)

    def __call__(
        self,
        x: mx.array,
        rotary: tuple[mx.array, mx.array],
        segments: Sequence[tuple[int, int, int]],
    ) -> mx.array:
        N = x.shape[0]
        qkv = self.qkv(x).reshape(N, 3, self.n_heads, self.head_dim)  # rows [q | k | v]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # each [N, nh, d]
        q, k = rotate(q, *rotary), rotate(k, *rotary)
        outputs = []
        for start, groups, length in segments:  # one grid: `groups` frames of `length` patches
            q_part, k_part, v_part = (
                self.frame_heads(a[start : start + groups * length], groups, length)
                for a in (q, k, v)
            )
            out = mx.fast.scaled_dot_product_attention(
                q_part, k_part, v_part, scale=self.head_dim**-0.5
            )
            outputs.append(out.transpose(0, 2, 1, 3).reshape(groups * length, -1))
        out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)  # [N, nh*d]
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        # gelu_pytorch_tanh is the tanh approximation, mlx's gelu_approx
        self.act = nn.gelu_approx if config.hidden_act == "gelu_pytorch_tanh" else nn.gelu

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x: mx.array, rotary, segments) -> mx.array:
        x = x + self.attn(self.norm1(x), rotary, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 2x2 block's 4 patches concatenated through an MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size**2
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, config.out_hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x).reshape(-1, self.merged)  # [N/4, 4*Hvis]
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))  # exact (erf) GELU here


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        import numpy as np

        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config)
        quarter = config.head_dim // 4  # frequencies per axis: rows and columns share them
        self._inv_freq = 1.0 / config.rope_theta ** (np.arange(quarter) * 2 / (2 * quarter))

    def __call__(self, pixel_values: mx.array, grid_thw) -> mx.array:
        """Encode patches to language-model features.

        Args:
            pixel_values: [N, C*Tp*P*P] patches as the image/video processor returns them.
            grid_thw: [n, 3] (t, h, w) per image or video, in patches.

        Returns:
            [N / merge**2, out_hidden_size] features, one per placeholder token, in order.
        """
        config = self.config
        grids = as_grids(grid_thw, config.spatial_merge_size)
        patches = sum(t * h * w for t, h, w in grids)
        if tuple(pixel_values.shape) != (patches, config.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grids} needs "
                f"({patches}, {config.patch_dim}); pass the pixel values and grids the "
                "processor returned together"
            )
        x = self.patch_embed(pixel_values)
        x = x + self.learned_positions(grids).astype(x.dtype)
        rotary = self.rotary_angles(grids)
        segments, start = [], 0
        for t, h, w in grids:
            segments.append((start, t, h * w))
            start += t * h * w
        for block in self.blocks:
            x = block(x, rotary, segments)
        return self.merger(x)

    def learned_positions(self, grids: Sequence[Grid]) -> mx.array:
        """The learned grid resampled bilinearly to each frame's size: [N, Hvis]."""
        import numpy as np

        side, merge = self.config.grid_side, self.config.spatial_merge_size
        indices, weights = [], []
        for t, h, w in grids:
            rows, cols = merge_block_coordinates(h, w, merge)
            row_taps, row_weights = bilinear_taps(rows, h, side)
            col_taps, col_weights = bilinear_taps(cols, w, side)
            # 2x2 taps per patch, flattened into the [side * side] table; same for every frame
            frame_indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
            frame_weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
            indices.append(np.tile(frame_indices, (t, 1)))
            weights.append(np.tile(frame_weights, (t, 1)))
        taps = self.pos_embed(mx.array(np.concatenate(indices), dtype=mx.int32))  # [N, 4, Hvis]
        return (taps * mx.array(np.concatenate(weights))[..., None]).sum(axis=1)

    def rotary_angles(self, grids: Sequence[Grid]) -> tuple[mx.array, mx.array]:
        """cos, sin [N, 1, head_dim] (broadcast over heads) of the 2-D rotary: angles
        [row*f, col*f] twice over."""
        import numpy as np

        merge = self.config.spatial_merge_size
        coords = [
            np.tile(np.stack(merge_block_coordinates(h, w, merge), axis=-1), (t, 1))
            for t, h, w in grids
        ]
        coords = np.concatenate(coords)  # [N, 2] (row, col)
        angles = (coords[:, :, None] * self._inv_freq).reshape(len(coords), -1)  # [N, d/2]
        angles = mx.array(np.concatenate([angles, angles], axis=-1)[:, None], dtype=mx.float32)
        return mx.cos(angles), mx.sin(angles)
