"""Gated DeltaNet scan kernels behind one dispatcher (`gated_delta_update`)."""

from .gated_delta import SCAN_PATHS, gated_delta_update, pick_path

__all__ = ["SCAN_PATHS", "gated_delta_update", "pick_path"]
