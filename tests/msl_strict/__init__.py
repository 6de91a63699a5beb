"""Strict compile check of our Metal kernels: MLX's exact generated source through clang.

    from msl_strict import StrictError, strict_check
    strict_check(spec, inputs, launch)  # raises StrictError naming what Metal would reject

See check.py for the compile and msl_strict.h for the MSL surface it declares.
"""

from .check import StrictError, strict_check, strict_source

__all__ = ["StrictError", "strict_check", "strict_source"]
