"""Benchmarks: random-weight checkpoints in the released layout, and speed/memory runs against mlx-lm."""
