"""Benchmarks that race qwen35_mlx against other libraries (mlx-lm, mlx-vlm, MLX's own kernels).

They live outside the installed package because they import those libraries and reach into
their internals. Run them from the repository root, e.g. `python -m benchmarks.kernels`; each
prints ratios against the peer measured in the same run. `qwen35-mlx bench` times your own setup.
"""
