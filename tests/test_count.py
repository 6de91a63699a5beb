"""Primitives per decoded token of the whole model (qwen35_mlx/bench/model_primitives.py): the
whole-model trace against the sum of its parts traced one by one, the Metal fast-op count
against hand counts, and the table `qwen35-mlx bench kernels` prints."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import pytest

from qwen35_mlx import cli
from qwen35_mlx.bench import kernel_counters, model_primitives
from qwen35_mlx.bench.count import decode_primitive_counts, primitive_counts
from qwen35_mlx.bench.random_checkpoint import TOKEN_IDS, config_json
from qwen35_mlx.gated_delta.decode_step import head_split
from qwen35_mlx.models.cache import KVCache

# Tiny dims with each size's structure: 0.8B ties the head and has Hv = Hk, 9B has its own head
# and Hv = 2 Hk. MLX's Metal sdpa fuses head dim 64 at one query; mlx-lm takes its gated delta
# kernel for DeltaNet head dims that are multiples of 32.
TINY_TEXT = dict(
    vocab_size=512,
    bos_token_id=504,
    eos_token_id=504,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    rope_parameters={**config_json()["text_config"]["rope_parameters"], "mrope_section": [3, 3, 2]},
)
VALUE_HEADS = {"0.8B": 2, "9B": 4}
LAYERS = 8  # two blocks of 3 DeltaNet layers and one attention layer


def tiny_config(size: str) -> dict:
    text = {**TINY_TEXT, "linear_num_value_heads": VALUE_HEADS[size]}
    ids = dict(zip(TOKEN_IDS, range(500, 504)))  # inside the tiny vocabulary
    overrides = {"text_config": text, **ids}
    return config_json(size, num_layers=LAYERS, overrides=overrides, vision=False, mtp=False)


def traced(fn, *args) -> int:
    return sum(primitive_counts(fn, *args).values())


def attention_primitives(attention, hidden: int, text: dict) -> int:
    """One token through a full-attention block whose cache holds CACHED_TOKENS tokens."""
    cache = KVCache()
    held = mx.zeros(
        (1, text["num_key_value_heads"], model_primitives.CACHED_TOKENS, text["head_dim"]),
        dtype=mx.bfloat16,
    )
    mx.eval(cache.update_and_fetch(held, held))

    def step(x, keys, values):
        cache.buffer.keys, cache.buffer.values = keys, values
        return attention(x, None, cache), cache.buffer.keys, cache.buffer.values

    x = mx.zeros((1, 1, hidden), dtype=mx.bfloat16)
    return traced(step, x, cache.buffer.keys, cache.buffer.values)


def fused_dispatches(config: dict) -> int:
    """Kernels per DeltaNet layer of our fused decode (B = 1): the step, plus the gated norm's own
    dispatch when the heads are split over threadgroups."""
    text = config["text_config"]
    return 1 + (head_split(1, text["linear_num_value_heads"], text["linear_value_head_dim"]) > 1)


def parts_sum(model, decode_path: str, text: dict) -> int:
    """Embedding + each decoder layer (its two norms, mixer, MLP and two residual adds) +
    final norm + head, each traced on its own."""
    lm = model.language_model
    hidden = text["hidden_size"]
    x = mx.zeros((1, 1, hidden), dtype=mx.bfloat16)
    total = traced(lambda ids: (lm.model.embed_tokens(ids),), mx.array([[0]]))
    for layer in model.layers:
        norms_and_mlp = (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp)
        total += sum(traced(lambda x, m=module: (m(x),), x) for module in norms_and_mlp)
        total += 2  # the residual adds
        if layer.is_linear:  # the per-layer counter of benchmarks/kernels.py
            total += sum(decode_primitive_counts(layer.linear_attn, decode_path).values())
        else:
            total += attention_primitives(layer.self_attn, hidden, text)
    total += traced(lambda x: (lm.model.norm(x),), x)
    return total + traced(lambda x: (lm.head(x),), x)


@pytest.mark.parametrize("weights", model_primitives.WEIGHTS)
@pytest.mark.parametrize("size", ["0.8B", "9B"])
def test_whole_model_is_the_sum_of_its_parts(size, weights):
    config = tiny_config(size)
    model = model_primitives.our_model(config, weights)
    linear = sum(layer.is_linear for layer in model.layers)
    assert linear == 6
    for path, kernels in (("plain", 0), ("fused", linear * fused_dispatches(config))):
        _, whole, custom = model_primitives.our_decode(model, path)
        assert whole == parts_sum(model, path, config["text_config"])
        assert custom == kernels


def test_quantized_weights_cost_fewer_primitives():
    counts = {
        weights: model_primitives.our_decode(
            model_primitives.our_model(tiny_config("9B"), weights), "fused"
        )
        for weights in model_primitives.WEIGHTS
    }
    # a quantized matmul is one primitive; a bf16 Linear also draws its weight's transpose
    assert counts["4-bit"][1] < counts["bf16"][1]


def test_fast_ops_fused_on_metal_count_once():
    x = mx.zeros((1, 1, 64), dtype=mx.bfloat16)
    w = mx.ones((64,), dtype=mx.bfloat16)
    mx.eval(w)  # a constant, not drawn

    def norms_and_rope(x):
        normed = mx.fast.rms_norm(x, w, 1e-6) + mx.fast.rms_norm(x, None, 1e-6)
        return (mx.fast.rope(normed[None], 16, traditional=False, base=1e4, scale=1.0, offset=3),)

    primitives, traced_here, kernels = model_primitives.metal_counts(norms_and_rope, x)
    assert primitives == 5  # two RMSNorm, the Add, the ExpandDims of [None], RoPE
    assert traced_here > primitives and kernels == 0

    def attend(q, k):
        return (mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1),)

    keys = mx.zeros((1, 2, 10, 64), dtype=mx.bfloat16)
    fused = model_primitives.metal_counts(attend, mx.zeros((1, 4, 1, 64), mx.bfloat16), keys)
    assert fused[0] == 1 and fused[1] > 1  # the vector kernel: one query, head dim 64
    # head dim 32: MLX's Metal back end takes the fallback too, every op counts
    q32, k32 = mx.zeros((1, 4, 1, 32), mx.bfloat16), mx.zeros((1, 2, 10, 32), mx.bfloat16)
    unfused = model_primitives.metal_counts(attend, q32, k32)
    assert unfused[0] == unfused[1] > 1


def test_compiled_functions_count_as_fused():
    from mlx_lm.models import qwen3_next  # SwiGLU: mx.compile'd silu(gate) * x

    x = mx.zeros((1, 1, 64), dtype=mx.bfloat16)
    primitives, traced_here, _ = model_primitives.metal_counts(
        lambda gate, x: (qwen3_next.swiglu(gate, x) + x,), x, x
    )
    assert (primitives, traced_here) == (2, 4)  # Compiled + Add; Sigmoid, 2 Multiply, Add
    # mlx.nn's silu is compiled too: one primitive, not Sigmoid and Multiply
    assert model_primitives.metal_counts(lambda x: (nn.silu(x),), x)[:2] == (1, 2)


def test_mlx_lm_metal_branch_takes_its_kernel_in_every_deltanet_layer():
    model = model_primitives.mlx_lm_model(tiny_config("9B"), "bf16")
    plain = model_primitives.mlx_lm_decode(model)
    with model_primitives.mlx_lm_metal_branch():
        metal = model_primitives.mlx_lm_decode(model)
    assert (plain[2], metal[2]) == (0, 6)
    assert metal[1] < plain[1]
    assert not mx.metal.is_available()  # restored


def test_bench_kernels_prints_whole_model_primitives(monkeypatch, capsys):
    monkeypatch.setattr(model_primitives, "checkpoint_config", tiny_config)
    monkeypatch.setattr(kernel_counters, "load_emulator", lambda: None)
    assert cli.main(["bench", "kernels"]) == 0
    cells = [re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()]
    rows = {(c[0], c[1], c[2]): c[3:] for c in cells if len(c) == 7 and c[0] in VALUE_HEADS}
    assert set(rows) == {
        (size, weights, name)
        for size in VALUE_HEADS
        for weights in model_primitives.WEIGHTS
        for name in model_primitives.IMPLEMENTATIONS
    }
    for (size, weights, name), (primitives, traced_here, kernels, ratio) in rows.items():
        peer = int(rows[size, weights, model_primitives.PEER][0])
        assert float(ratio.rstrip("x")) == pytest.approx(int(primitives) / peer, abs=5e-3)
        assert int(primitives) <= int(traced_here)
        metal = 6 * (fused_dispatches(tiny_config(size)) if name.startswith("ours") else 1)
        assert int(kernels) == (metal if name.endswith("Metal") else 0)
    ours = model_primitives.our_decode(
        model_primitives.our_model(tiny_config("0.8B"), "bf16"), "fused"
    )
    assert rows["0.8B", "bf16", "ours Metal"][:3] == [str(n) for n in ours]
