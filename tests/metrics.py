"""The one error metric of the numeric tests."""

import numpy as np


def relative_error(ours, reference) -> float:
    """||ours - reference|| / ||reference|| in float64; NaN or inf anywhere never passes."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    if not (np.isfinite(ours).all() and np.isfinite(reference).all()):
        return float("inf")
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
