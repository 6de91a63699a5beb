"""Config validation on the four released sizes and on what real configs carry."""

import copy

import pytest

from qwen35_mlx.bench.random_checkpoint import SIZES, config_json
from qwen35_mlx.models.config import ConfigError, ModelConfig

# docs/ARCHITECTURE.md §1.2, derived values
EXPECTED = {"0.8B": (24, 6144, 64, True), "2B": (24, 6144, 64, True),
            "4B": (32, 8192, 64, True), "9B": (32, 8192, 64, False)}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_released_sizes_parse(size):
    config = ModelConfig.from_hf(config_json(size))
    layers, conv_dim, rotary_dim, tied = EXPECTED[size]
    assert config.text.num_hidden_layers == layers and config.text.conv_dim == conv_dim
    assert config.text.rotary_dim == rotary_dim and config.tie_word_embeddings == tied
    assert config.text.layer_types[3::4] == ("full_attention",) * (layers // 4)


def with_text(**fields):
    config = copy.deepcopy(config_json("0.8B"))
    config["text_config"].update(fields)
    return config


def test_fields_seen_in_real_configs_are_accepted():
    config = with_text(output_gate_type="swish", attn_output_gate=True, mamba_ssm_dtype="float32")
    config["language_model_only"] = False
    ModelConfig.from_hf(config)


@pytest.mark.parametrize("fields, message", [
    ({"output_gate_type": "sigmoid"}, "output_gate_type 'sigmoid' is not supported"),
    ({"sliding_window": 4096}, r"unknown field\(s\) \['sliding_window'\]"),
    ({"layer_types": ["linear_attention"] * 3}, "layer_types has 3 entries"),
    ({"linear_num_value_heads": 24}, "multiple of linear_num_key_heads"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e7}}, "rope_type 'dynamic'"),
], ids=["gate", "unknown-key", "layer-types", "heads", "rope-type"])
def test_bad_configs_name_the_problem(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(with_text(**fields))
