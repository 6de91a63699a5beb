"""Config validation on the four released sizes and on what real configs carry."""

import copy

import pytest

from qwen35_mlx.bench.random_checkpoint import SIZES, config_json
from qwen35_mlx.models.config import ConfigError, ModelConfig

# docs/ARCHITECTURE.md §1.2, derived values
EXPECTED = {
    "0.8B": (24, 6144, 64, True),
    "2B": (24, 6144, 64, True),
    "4B": (32, 8192, 64, True),
    "9B": (32, 8192, 64, False),
}


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


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"output_gate_type": "sigmoid"}, "output_gate_type 'sigmoid' is not supported"),
        ({"sliding_window": 4096}, r"unknown field\(s\) \['sliding_window'\]"),
        ({"layer_types": ["linear_attention"] * 3}, "layer_types has 3 entries"),
        ({"linear_num_value_heads": 24}, "multiple of linear_num_key_heads"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e7}}, "rope_type 'dynamic'"),
    ],
    ids=["gate", "unknown-key", "layer-types", "heads", "rope-type"],
)
def test_bad_configs_name_the_problem(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(with_text(**fields))


BAD_TEXT_VALUES = {
    "string-size": ({"vocab_size": "248320"}, "vocab_size = '248320' must be an integer"),
    "float-size": ({"num_hidden_layers": 24.0}, "num_hidden_layers = 24.0 must be an integer"),
    "bool-size": ({"head_dim": True}, "head_dim = True must be an integer"),
    "zero-size": ({"hidden_size": 0}, "hidden_size = 0 must be an integer from 1 to 16777216"),
    "negative-heads": ({"num_key_value_heads": -2}, "num_key_value_heads = -2 must be"),
    "huge-vocab": ({"vocab_size": 10**12}, "vocab_size = 1000000000000 must be an integer"),
    "zero-eps": ({"rms_norm_eps": 0}, "rms_norm_eps = 0 must be > 0"),
    "negative-eps": ({"rms_norm_eps": -1e-6}, "rms_norm_eps = -1e-06 must be > 0"),
    "string-eps": ({"rms_norm_eps": "1e-6"}, "rms_norm_eps = '1e-6' must be a finite number"),
    "zero-theta": (
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 0,
                "mrope_section": [11, 11, 10],
            }
        },
        "rope_parameters: rope_theta = 0 must be > 0",
    ),
    "negative-theta": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": -1e7}},
        "rope_theta = -10000000.0 must be > 0",
    ),
    "string-bias": ({"attention_bias": "false"}, "attention_bias = 'false' must be true or false"),
    "layer-types-string": (
        {"layer_types": "linear_attention"},
        "layer_types = 'linear_attention' must be a list",
    ),
    "mrope-strings": (
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e7,
                "mrope_section": ["11", 11, 10],
            }
        },
        "mrope_section = \\['11', 11, 10\\] must be a list of integers",
    ),
    "eos-outside-vocab": (
        {"eos_token_id": 248320},
        r"eos_token_id \[248320\] is outside the "
        "vocabulary",
    ),
}


@pytest.mark.parametrize("fields, message", BAD_TEXT_VALUES.values(), ids=BAD_TEXT_VALUES)
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message) as raised:
        ModelConfig.from_hf(with_text(**fields))
    assert "correct it in config.json" in str(raised.value)


def with_top(**fields):
    config = copy.deepcopy(config_json("0.8B"))
    config.update(fields)
    return config


BAD_TOP_VALUES = {
    "string-tie": (
        {"tie_word_embeddings": "false"},
        "config.json: tie_word_embeddings = 'false' must be true or false",
    ),
    "token-id-outside-vocab": (
        {"image_token_id": 10**6},
        r"image_token_id \[1000000\] is outside the vocabulary",
    ),
    "vision-zero-size": (
        {"vision_config": {**config_json("0.8B")["vision_config"], "depth": 0}},
        "config.json vision_config: depth = 0 must be an integer from 1",
    ),
    "quantization-bits": (
        {"quantization": {"group_size": 64, "bits": "4"}},
        "config.json quantization: bits = '4' must be an integer from 1 to 8",
    ),
    "text-config-list": (
        {"text_config": []},
        "config.json: text_config = \\[\\] must be an object",
    ),
}


@pytest.mark.parametrize("fields, message", BAD_TOP_VALUES.values(), ids=BAD_TOP_VALUES)
def test_bad_top_level_values_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(with_top(**fields))


@pytest.mark.parametrize("value", [[], "qwen3_5", 3], ids=["list", "string", "number"])
def test_config_that_is_not_an_object(value):
    with pytest.raises(
        ConfigError, match=f"config.json: holds a JSON {type(value).__name__}, not an object"
    ):
        ModelConfig.from_hf(value)


def test_null_means_absent():
    # transformers writes null for unset optional fields: the defaults apply
    plain = ModelConfig.from_hf(config_json("0.8B"))
    nulls = with_text(rope_scaling=None, rms_norm_eps=None, attention_bias=None)
    assert ModelConfig.from_hf(nulls).text == plain.text
