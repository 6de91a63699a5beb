"""The text model against transformers, and the cache invariants."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.gated_delta import SCAN_PATHS
from qwen35_mlx.gated_delta import dispatch as gated_delta
from qwen35_mlx.loading import load_model

from checkpoints import Spec
from helpers import prompt, reference_logits
from metrics import relative_error

SPECS = [
    Spec(layout=layout, hv_per_hk=ratio, tied=tied)
    for layout, ratio, tied in itertools.product(("causal", "conditional"), (1, 2), (False, True))
]


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_logits_match_transformers(make_checkpoint, spec):
    directory, reference = make_checkpoint(spec)
    model = load_model(directory)
    ids = prompt(batch=2)
    ours = np.array(model(mx.array(ids)))
    assert relative_error(ours, reference_logits(reference, ids)) <= 1e-4


@pytest.mark.parametrize("path", sorted(SCAN_PATHS))
def test_each_scan_path_matches_transformers(make_checkpoint, monkeypatch, path):
    directory, reference = make_checkpoint(Spec(hv_per_hk=2))
    monkeypatch.setattr(gated_delta, "pick_path", lambda num_tokens: path)
    ids = prompt(length=130)
    ours = np.array(load_model(directory)(mx.array(ids)))
    assert relative_error(ours, reference_logits(reference, ids)) <= 1e-4


def test_yarn_rope_matches_transformers(make_checkpoint):
    directory, reference = make_checkpoint(Spec(rope_type="yarn"))
    ids = prompt()
    ours = np.array(load_model(directory)(mx.array(ids)))
    assert relative_error(ours, reference_logits(reference, ids)) <= 1e-4


def test_sharded_checkpoint_loads(make_checkpoint):
    directory, reference = make_checkpoint(Spec(max_shard_size="100KB"))
    assert (directory / "model.safetensors.index.json").is_file()
    model = load_model(directory)
    ids = prompt()
    assert relative_error(np.array(model(mx.array(ids))), reference_logits(reference, ids)) <= 1e-4


@pytest.mark.parametrize(
    "splits",
    [[100], [37, 1, 50, 12], [64, 36], [1] * 100],
    ids=["full", "uneven", "chunk-edge", "token-by-token"],
)
def test_cached_forward_matches_full(make_checkpoint, splits):
    directory, _ = make_checkpoint(Spec(hv_per_hk=2))
    model = load_model(directory)
    ids = prompt()
    full = np.array(model(mx.array(ids)))
    cache, pieces, start = model.make_cache(), [], 0
    for size in splits:
        pieces.append(np.array(model(mx.array(ids[:, start : start + size]), cache=cache)))
        start += size
    assert relative_error(np.concatenate(pieces, axis=1), full) <= 1e-5


def test_cache_shapes_and_dtypes(make_checkpoint):
    directory, _ = make_checkpoint(Spec(hv_per_hk=2))
    model = load_model(directory, dtype="bfloat16")
    cache = model.make_cache()
    model(mx.array(prompt(length=10)), cache=cache)
    conv, recurrent = cache[0][0], cache[0][1]
    assert conv.shape == (1, 3, 2 * 32 + 64) and conv.dtype == mx.bfloat16  # [B, K-1, conv_dim]
    assert recurrent.shape == (1, 4, 16, 16) and recurrent.dtype == mx.float32  # [B, Hv, Dv, Dk]
    (keys, values), offset = cache[3].state, cache[3].offset
    assert offset == 10 and keys.shape[:2] == values.shape[:2] == (1, 2)  # [B, nkv, T, hd]
    assert keys.shape[3] == 32 and keys.dtype == mx.bfloat16


def test_bfloat16_stays_close_to_float32(make_checkpoint):
    directory, _ = make_checkpoint(Spec(hv_per_hk=2))
    ids = mx.array(prompt())
    full = np.array(load_model(directory, dtype="float32")(ids))
    half_model = load_model(directory, dtype="bfloat16")
    assert half_model.language_model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert half_model.layers[0].linear_attn.A_log.dtype == mx.float32
    half = np.array(half_model(ids).astype(mx.float32))
    assert relative_error(half, full) <= 2e-2
