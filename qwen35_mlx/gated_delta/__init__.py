"""Gated DeltaNet scan paths behind one dispatcher: `gated_delta_update`, `gated_delta_decode`."""

from .dispatch import (
    DECODE_PATHS,
    SCAN_PATHS,
    gated_delta_decode,
    gated_delta_update,
    pick_path,
    use_fused_decode,
)

__all__ = [
    "DECODE_PATHS",
    "SCAN_PATHS",
    "gated_delta_decode",
    "gated_delta_update",
    "pick_path",
    "use_fused_decode",
]
