"""M-RoPE position ids of prompts with images and videos (transformers' `get_rope_index`).

Per sequence, text tokens count up on all three rows (T, H, W). A vision grid (t, h, w) in
patches becomes (t, h/M, w/M) placeholder tokens in row-major order with positions
T = cur + frame, H = cur + row, W = cur + col, after which cur advances by max(h/M, w/M).
A video is split into its t temporal groups, each its own run: the prompt writes each group as
`<{ts} seconds><|vision_start|><|video_pad|>...<|vision_end|>`. docs/ARCHITECTURE.md §3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from .vision import Grid, as_grids

if TYPE_CHECKING:  # numpy is imported where it is used: it costs ~0.2 s at start-up
    import numpy as np


def rope_index(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> tuple[mx.array, mx.array]:
    """Position ids for a batch of prompts.

    Args:
        input_ids: [B, T] token ids with image/video placeholder tokens.
        image_grid_thw, video_grid_thw: [n, 3] (t, h, w) in patches per image / video, in prompt
            order across the whole batch; None when there are none.

    Returns:
        (position_ids [3, B, T] int32, rope_delta [B] int32): the decode positions after the
        prompt are cache offset + rope_delta on all three rows.
    """
    import numpy as np

    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    merge = spatial_merge_size
    grids = {
        image_token_id: iter(as_grids(image_grid_thw if image_grid_thw is not None else [], merge)),
        # each temporal group of a video is a run of its own
        video_token_id: iter(
            [
                (1, h, w)
                for t, h, w in as_grids(video_grid_thw if video_grid_thw is not None else [], merge)
                for _ in range(t)
            ]
        ),
    }
    B, T = ids.shape
    positions = np.zeros((3, B, T), dtype=np.int64)
    for b in range(B):
        _sequence_positions(ids[b], grids, merge, positions[:, b])
    for token, left in grids.items():
        if next(left, None) is not None:
            kind = "image" if token == image_token_id else "video"
            raise ValueError(
                f"more {kind} grids than {kind} placeholder runs in input_ids; "
                "pass the prompt and the grids of the same processor call"
            )
    deltas = positions.max(axis=(0, 2)) + 1 - T if T else np.zeros(B, dtype=np.int64)
    return mx.array(positions, dtype=mx.int32), mx.array(deltas, dtype=mx.int32)


def _sequence_positions(ids: np.ndarray, grids: dict, merge: int, out: np.ndarray) -> None:
    """Fills out [3, T] for one sequence, taking grids from the shared iterators in order."""
    import numpy as np

    kinds = np.where(np.isin(ids, list(grids)), ids, -1)  # placeholder id, or -1 for text
    edges = np.flatnonzero(np.diff(kinds)) + 1
    cur = 0
    for start, end in zip([0, *edges], [*edges, len(ids)]):
        if kinds[start] == -1:
            out[:, start:end] = cur + np.arange(end - start)
            cur += end - start
            continue
        while start < end:  # adjacent grids without a token between them share one run
            grid = next(grids[kinds[start]], None)
            if grid is None:
                raise ValueError(
                    f"input_ids has more placeholder tokens {kinds[start]} than "
                    "the grids passed describe; pass every image/video grid"
                )
            block = vision_positions(grid, merge) + cur  # [3, n]
            if start + block.shape[1] > end:
                raise ValueError(
                    f"grid {grid} needs {block.shape[1]} placeholder tokens but "
                    f"the run in input_ids has {end - start}"
                )
            out[:, start : start + block.shape[1]] = block
            start += block.shape[1]
            cur += max(grid[1], grid[2]) // merge


def vision_positions(grid: Grid, merge: int) -> np.ndarray:
    """[3, t*(h/M)*(w/M)] (frame, row, col) of one grid's placeholder tokens, row-major."""
    import numpy as np

    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    return np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(
        3, -1
    )
