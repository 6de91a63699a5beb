"""Attention paths and the quantized KV cache against float64 numpy and transformers."""

import functools

import mlx.core as mx
import numpy as np
import pytest
import torch

from qwen35_mlx.loading import load_model
from qwen35_mlx.models import attention
from qwen35_mlx.models.cache import KVCache, QuantizedKVCache, make_layer_caches

from checkpoints import Spec
from metrics import relative_error

SCALE = 0.125
DTYPES = {"float32": (mx.float32, 1e-5), "bfloat16": (mx.bfloat16, 1e-2)}


def reference_attention(q, k, v, scale, causal):
    """float64 softmax(q kᵀ scale) v, keys repeated per query group; causal aligned to the end."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    repeats = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, repeats, axis=1), np.repeat(v, repeats, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale  # [B, Hq, Tq, Tk]
    num_queries, num_keys = q.shape[2], k.shape[2]
    if causal:
        positions = np.arange(num_keys - num_queries, num_keys)
        scores = np.where(positions[:, None] >= np.arange(num_keys)[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (probs / probs.sum(axis=-1, keepdims=True)) @ v


def random_qkv(batch, num_queries, num_keys, head_dim=64, heads=4, kv_heads=2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, num_queries, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, num_keys, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, num_keys, head_dim)).astype(np.float32)
    return q, k, v


def as_float64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("offset", [0, 100])
def test_blocked_matches_float64(dtype, batch, causal, offset):
    mx_dtype, tolerance = DTYPES[dtype]
    q, k, v = (mx.array(x).astype(mx_dtype) for x in random_qkv(batch, 37, 37 + offset))
    ours = attention.blocked_attention(q, k, v, SCALE, causal, block_size=16, query_block=16)
    assert ours.dtype == mx_dtype
    reference = reference_attention(*(as_float64(x) for x in (q, k, v)), SCALE, causal)
    assert relative_error(as_float64(ours), reference) <= tolerance


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_queries", [37, 1])
def test_quantized_matches_float64_on_dequantized(bits, batch, num_queries):
    q, k, v = random_qkv(batch, num_queries, num_queries + 100)
    quantize = lambda x: tuple(mx.quantize(mx.array(x), group_size=32, bits=bits))
    k_quant, v_quant = quantize(k), quantize(v)
    dequantize = lambda t: np.array(mx.dequantize(*t, group_size=32, bits=bits))
    ours = attention.quantized_attention(
        mx.array(q), k_quant, v_quant, SCALE, True, 32, bits, block_size=16, query_block=16
    )
    reference = reference_attention(q, dequantize(k_quant), dequantize(v_quant), SCALE, True)
    assert relative_error(np.array(ours), reference) <= 1e-5


def test_dispatcher_on_cpu_blocks_large_scores_only():
    with mx.stream(mx.cpu):
        small = [mx.zeros((1, 8, 2048, 256))] + [mx.zeros((1, 2, 1024, 256))] * 2
        large = [mx.zeros((1, 8, 2048, 256))] + [mx.zeros((1, 2, 2048, 256))] * 2
        decode = [mx.zeros((1, 8, 1, 256))] + [mx.zeros((1, 2, 32768, 256))] * 2
        assert not attention.has_fused_kernel(*large)
        assert attention.pick_path(*small) == "fast"  # 2048 x 1024 scores: at the threshold
        assert attention.pick_path(*large) == "blocked"
        assert attention.pick_path(*decode) == "fast"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dispatch_blocked_equals_fast(monkeypatch, causal):
    q, k, v = (mx.array(x) for x in random_qkv(2, 37, 137))
    mask = "causal" if causal else None
    fast = attention.scaled_dot_product_attention(q, k, v, SCALE, mask)
    monkeypatch.setattr(attention, "BLOCKED_MIN_SCORES", 0)
    assert attention.pick_path(q, k, v) == "blocked"
    blocked = attention.scaled_dot_product_attention(q, k, v, SCALE, mask)
    reference = reference_attention(q, k, v, SCALE, causal)
    assert relative_error(np.array(fast), reference) <= 1e-5
    assert relative_error(np.array(blocked), reference) <= 1e-5


def reference_logits(torch_model, ids):
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.float().numpy()


def prompt(length=100, batch=1, seed=0):
    return np.random.default_rng(seed).integers(0, 496, size=(batch, length))


def run_in_pieces(model, ids, splits, cache):
    pieces, start = [], 0
    for size in splits:
        pieces.append(np.array(model(mx.array(ids[:, start : start + size]), cache=cache)))
        start += size
    return np.concatenate(pieces, axis=1)


SPLITS = [37, 1, 50, 12]  # uneven chunks, one single token


@pytest.fixture
def small_blocks(monkeypatch):
    """Every attention call blocked, in blocks of 16 keys and 16 queries."""
    blocked = functools.partial(attention.blocked_attention, block_size=16, query_block=16)
    monkeypatch.setattr(attention, "pick_path", lambda q, k, v: "blocked")
    monkeypatch.setattr(attention, "blocked_attention", blocked)


@pytest.mark.parametrize("with_cache", [False, True], ids=["full", "cached-pieces"])
def test_model_blocked_matches_transformers(make_checkpoint, small_blocks, with_cache):
    directory, reference = make_checkpoint(Spec(hv_per_hk=2))
    model = load_model(directory)
    ids = prompt(batch=2)
    if with_cache:
        ours = run_in_pieces(model, ids, SPLITS, model.make_cache())
    else:
        ours = np.array(model(mx.array(ids)))
    assert relative_error(ours, reference_logits(reference, ids)) <= 1e-4


# relative logit error vs transformers of the tiny model (head dim 32, groups of 32; one
# attention layer of four), measured on CPU: float 1.5e-7, 8 bits 8.3e-5, 4 bits 1.4e-3;
# bounds with about 5x headroom
KV_ERROR_BOUNDS = {None: 1e-4, 8: 5e-4, 4: 1e-2}


def test_quantized_cache_logits_error(make_checkpoint):
    directory, reference = make_checkpoint(Spec(hv_per_hk=2))
    model = load_model(directory)
    ids = prompt(batch=2)
    expected = reference_logits(reference, ids)
    errors = {}
    for bits in KV_ERROR_BOUNDS:
        cache = model.make_cache(kv_bits=bits, kv_group_size=32)
        errors[bits] = relative_error(run_in_pieces(model, ids, SPLITS, cache), expected)
    print("relative logit error by kv_bits:", errors)
    for bits, bound in KV_ERROR_BOUNDS.items():
        assert errors[bits] <= bound, errors
    assert errors[None] < errors[8] <= errors[4]


def test_quantized_kv_start_switches_once_held(make_checkpoint):
    directory, _ = make_checkpoint(Spec(hv_per_hk=2))
    model = load_model(directory)
    ids = prompt()
    splits = [37, 13, 1, 49]
    float_logits = run_in_pieces(model, ids, splits, model.make_cache())
    cache = model.make_cache(kv_bits=8, kv_group_size=32, quantized_kv_start=50)
    attention_cache = cache[3]
    start, seen = 0, []
    for size in splits:
        logits = np.array(model(mx.array(ids[:, start : start + size]), cache=cache))
        seen.append((attention_cache.offset, attention_cache.quantization))
        if start + size <= 50:  # the float cache until 50 tokens are held: the same logits
            np.testing.assert_array_equal(logits, float_logits[:, start : start + size])
        start += size
    assert seen == [(37, None), (50, None), (51, (32, 8)), (100, (32, 8))]
    assert [a.dtype for a in attention_cache.state][::3] == [mx.uint32, mx.uint32]


def test_quantized_cache_holds_what_was_written():
    rng = np.random.default_rng(1)
    keys, values = (rng.standard_normal((2, 2, 300, 64)).astype(np.float32) for _ in range(2))
    cache = QuantizedKVCache(group_size=64, bits=8, start=100)
    for start, end in [(0, 100), (100, 101), (101, 300)]:
        held_keys, held_values = cache.update_and_fetch(
            mx.array(keys[:, :, start:end]), mx.array(values[:, :, start:end])
        )
    for held, written in [(held_keys, keys), (held_values, values)]:
        restored = np.array(mx.dequantize(*held, group_size=64, bits=8))
        assert relative_error(restored, written) <= 1e-2  # 8-bit rounding of each group


def kv_cache_bytes(cache) -> int:
    return sum(a.nbytes for a in cache.state)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_kv_bytes_per_token_formula(dtype, bits):
    heads, head_dim, group_size, tokens = 2, 256, 64, 2 * KVCache.step  # a full buffer
    cache = KVCache() if bits is None else QuantizedKVCache(group_size, bits)
    x = mx.zeros((1, heads, tokens, head_dim), dtype)
    cache.update_and_fetch(x, x)
    size = 4 if dtype == mx.float32 else 2
    if bits is None:  # keys and values, each heads x head_dim values
        per_token = 2 * heads * head_dim * size
    else:  # packed values plus one scale and one bias per group
        per_token = 2 * heads * (head_dim * bits // 8 + 2 * (head_dim // group_size) * size)
    assert kv_cache_bytes(cache) == tokens * per_token
    expected = {
        mx.bfloat16: {None: 2048, 8: 1088, 4: 576},
        mx.float32: {None: 4096, 8: 1152, 4: 640},
    }  # worked by hand
    assert per_token == expected[dtype][bits]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_bits=3), "kv_bits must be one of"),
        (dict(kv_bits=16), "kv_bits must be one of"),
        (dict(kv_bits=8, kv_group_size=16), "kv_group_size must be one of"),
        (dict(kv_bits=8, kv_group_size=64), "does not divide head_dim 32"),
        (dict(kv_bits=4, kv_group_size=32, quantized_kv_start=-1), "quantized_kv_start must be"),
    ],
)
def test_bad_quantization_arguments(make_checkpoint, kwargs, message):
    directory, _ = make_checkpoint(Spec(hv_per_hk=2))
    config = load_model(directory).language_model.config
    with pytest.raises(ValueError, match=message):
        make_layer_caches(config, **kwargs)


def test_attention_refuses_other_masks():
    q, k, v = (mx.array(x) for x in random_qkv(1, 3, 3))
    with pytest.raises(ValueError, match="mask must be None or 'causal'"):
        attention.scaled_dot_product_attention(q, k, v, SCALE, mx.ones((3, 3)))
