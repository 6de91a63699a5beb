"""Hugging Face Qwen3.5 checkpoints -> MLX checkpoints (float or 4/6/8-bit), and upload.

Installed as `qwen35_mlx.convert`; the commands are `qwen35-mlx convert` and `qwen35-mlx upload`.
"""

from .convert import ConvertError, convert
from .upload import upload

__all__ = ["ConvertError", "convert", "upload"]
