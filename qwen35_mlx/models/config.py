"""Validated, frozen configuration for Qwen3.5 checkpoints.

Reads the Hugging Face `config.json` of both layouts: `Qwen3_5ForConditionalGeneration`
(model_type "qwen3_5", text fields under `text_config`) and the text-only
`Qwen3_5ForCausalLM` (model_type "qwen3_5_text", text fields at the top level).
Unknown keys are an error that names them: a field we do not read may change the maths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

LINEAR, FULL = "linear_attention", "full_attention"

# Keys the checkpoints carry that do not change the text decoder's computation.
_TEXT_UNUSED = frozenset({
    "model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
    "initializer_range", "use_cache", "attention_dropout", "bos_token_id", "pad_token_id",
    "eos_token_id", "full_attention_interval", "attn_output_gate", "mtp_num_hidden_layers",
    "mtp_use_dedicated_embeddings", "mamba_ssm_dtype", "mlp_only_layers", "output_router_logits",
    "router_aux_loss_coef", "layer_scan", "_name_or_path", "tie_word_embeddings",
    "output_gate_type",  # the DeltaNet output gate: checked to be silu/swish in _text_config
    # written by converters at the top level of a text-only config; read by loading.py
    "quantization", "quantization_config",
    # legacy rope fields, folded into `rope_parameters` by `_rope_parameters`
    "rope_theta", "partial_rotary_factor", "rope_scaling",
})
_TOP_UNUSED = frozenset({
    "model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
    "tie_word_embeddings", "text_config", "vision_config", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "quantization", "quantization_config",
    "_name_or_path", "use_cache", "bos_token_id", "pad_token_id", "eos_token_id",
    "initializer_range", "language_model_only",
    "generation_config",  # mlx-vlm's converter copies generation_config.json in here
})
_ROPE_TYPES = ("default", "yarn")
_ROPE_KEYS = frozenset({
    "rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section",
    "mrope_interleaved", "factor", "original_max_position_embeddings", "beta_fast",
    "beta_slow", "attention_factor", "truncate", "mscale", "mscale_all_dim",
})
MODEL_TYPES = ("qwen3_5", "qwen3_5_text")


class ConfigError(ValueError):
    """A config.json that this package cannot run, with what to do about it."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    rope_type: str = "default"
    factor: float = 1.0  # yarn only
    original_max_position_embeddings: int | None = None  # yarn only
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    attention_bias: bool = False
    rope: RopeConfig = RopeConfig()

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"config.json: {message}")

        check(len(self.layer_types) == self.num_hidden_layers,
              f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
              f"{self.num_hidden_layers}; make them agree")
        bad = sorted(set(self.layer_types) - {LINEAR, FULL})
        check(not bad, f"unknown layer_types {bad}; expected {LINEAR!r} or {FULL!r}")
        check(self.num_attention_heads % self.num_key_value_heads == 0,
              "num_attention_heads must be a multiple of num_key_value_heads")
        check(self.linear_num_value_heads % self.linear_num_key_heads == 0,
              "linear_num_value_heads must be a multiple of linear_num_key_heads")
        check(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (silu)")
        check(not self.attention_bias, "attention_bias=true is not supported by Qwen3.5")
        check(self.rope.rope_type in _ROPE_TYPES,
              f"rope_type {self.rope.rope_type!r} is not supported; use one of {_ROPE_TYPES}")
        check(sum(self.rope.mrope_section) * 2 == self.rotary_dim,
              f"mrope_section {list(self.rope.mrope_section)} must sum to rotary dim / 2 = "
              f"{self.rotary_dim // 2}")
        if self.rope.rope_type == "yarn":
            check(self.rope.factor > 1 and self.rope.original_max_position_embeddings,
                  "yarn rope needs factor > 1 and original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    """The whole checkpoint config: the text decoder plus what later stages read raw."""

    model_type: str
    text: TextConfig
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    vision: dict[str, Any] | None = None  # kept verbatim for the vision tower
    token_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed `config.json`; raises ConfigError naming any problem."""
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not a Qwen3.5 model "
                f"(expected one of {MODEL_TYPES}); qwen35-mlx runs Qwen3.5 checkpoints only")
        if model_type == "qwen3_5":
            _reject_unknown(config, _TOP_UNUSED, "")
            text_fields = config.get("text_config")
            if not isinstance(text_fields, dict):
                raise ConfigError("config.json: model_type 'qwen3_5' needs a 'text_config' object")
            # HF ties the conditional-generation head on the top-level flag only.
            tie = bool(config.get("tie_word_embeddings", False))
        else:
            text_fields = config
            tie = bool(config.get("tie_word_embeddings", False))
        text = _text_config(text_fields, " text_config" if text_fields is not config else "")
        eos = text_fields.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        token_ids = {k: config[k] for k in ("image_token_id", "video_token_id",
                                            "vision_start_token_id", "vision_end_token_id")
                     if k in config}
        return cls(model_type=model_type, text=text, tie_word_embeddings=tie,
                   eos_token_ids=eos_ids, vision=config.get("vision_config"),
                   token_ids=token_ids, raw=config)


def _reject_unknown(fields: dict[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"config.json{where}: unknown field(s) {unknown}. qwen35-mlx does not know what they "
            "change; if they are harmless metadata, remove them from config.json, otherwise "
            "this checkpoint is not a plain Qwen3.5 model")


def _text_config(fields: dict[str, Any], where: str) -> TextConfig:
    names = {f.name for f in dataclasses.fields(TextConfig)} - {"rope", "layer_types"}
    _reject_unknown(fields, frozenset(names) | _TEXT_UNUSED | {"layer_types", "rope_parameters"},
                    where)
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "linear_num_key_heads",
                "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"]
    gate = fields.get("output_gate_type", "silu")
    if gate not in ("silu", "swish"):  # swish == silu; transformers hard-wires it
        raise ConfigError(f"config.json: output_gate_type {gate!r} is not supported (silu/swish)")
    missing = [k for k in required if k not in fields]
    if missing:
        raise ConfigError(f"config.json: missing required text field(s) {missing}")
    values = {k: fields[k] for k in names if k in fields}
    values.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    values.setdefault("linear_conv_kernel_dim", 4)
    layer_types = fields.get("layer_types")
    if layer_types is None:  # HF's save_pretrained keeps layer_types; older files only the interval
        interval = fields.get("full_attention_interval", 4)
        layer_types = [FULL if (i + 1) % interval == 0 else LINEAR
                       for i in range(fields["num_hidden_layers"])]
    config = TextConfig(layer_types=tuple(layer_types), rope=_rope_parameters(fields), **values)
    config.validate()
    return config


def _rope_parameters(fields: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; 4.x files used rope_theta + rope_scaling.
    params = dict(fields.get("rope_scaling") or {})
    params.update(fields.get("rope_parameters") or {})
    for legacy in ("rope_theta", "partial_rotary_factor"):
        if legacy in fields:
            params.setdefault(legacy, fields[legacy])
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"config.json: unknown rope_parameters field(s) {unknown}")
    return RopeConfig(
        theta=float(params.get("rope_theta", 10_000.0)),
        partial_rotary_factor=float(params.get("partial_rotary_factor", 0.25)),
        mrope_section=tuple(params.get("mrope_section", (11, 11, 10))),
        rope_type=params.get("rope_type", params.get("type", "default")),
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )
