"""The whole model on its Metal paths against transformers: every kernel call goes to the
MSL-on-CPU emulator, as a Mac would send it to the GPU."""

import mlx.core as mx
import numpy as np
import pytest
from test_model import prompt, reference_logits

from qwen35_mlx.gated_delta import dispatch as gated_delta
from qwen35_mlx.gated_delta.kernel import KernelSpec
from qwen35_mlx.loading import load_model

from checkpoints import Spec
from metrics import relative_error
from msl_emulator import run_on_emulator


@pytest.fixture
def metal(monkeypatch):
    """The dispatcher believes it runs on Metal; kernels run on the emulator."""
    monkeypatch.setattr(gated_delta, "metal_ready", lambda: True)
    monkeypatch.setattr(KernelSpec, "run", run_on_emulator)


@pytest.mark.parametrize("hv_per_hk", [1, 2], ids=["hv1", "hv2"])
def test_metal_prefill_then_fused_decode_match_transformers(make_checkpoint, metal, hv_per_hk):
    directory, reference = make_checkpoint(Spec(hv_per_hk=hv_per_hk))
    model = load_model(directory)
    ids = prompt(length=40)
    decoded = 3  # the last tokens go one at a time through the fused decode step
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(ids[:, :-decoded]), cache=cache))]  # chunked kernel
    for t in range(ids.shape[1] - decoded, ids.shape[1]):
        pieces.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    ours = np.concatenate(pieces, axis=1)
    assert relative_error(ours, reference_logits(reference, ids)) <= 1e-4
