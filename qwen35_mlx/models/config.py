"""Validated, frozen configuration for Qwen3.5 checkpoints.

Reads the Hugging Face `config.json` of both layouts: `Qwen3_5ForConditionalGeneration`
(model_type "qwen3_5", text fields under `text_config`) and the text-only
`Qwen3_5ForCausalLM` (model_type "qwen3_5_text", text fields at the top level).
Unknown keys are an error that names them: a field we do not read may change the maths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LINEAR, FULL = "linear_attention", "full_attention"

# Keys the checkpoints carry that do not change the text decoder's computation.
_TEXT_UNUSED = frozenset(
    {
        "model_type",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "initializer_range",
        "use_cache",
        "attention_dropout",
        "bos_token_id",
        "pad_token_id",
        "eos_token_id",
        "full_attention_interval",
        "attn_output_gate",
        "mtp_use_dedicated_embeddings",
        "mamba_ssm_dtype",
        "mlp_only_layers",
        "output_router_logits",
        "router_aux_loss_coef",
        "layer_scan",
        "_name_or_path",
        "tie_word_embeddings",
        "output_gate_type",  # the DeltaNet output gate: checked to be silu/swish in _text_config
        # written by converters at the top level of a text-only config; read by loading.py
        "quantization",
        "quantization_config",
        # legacy rope fields, folded into `rope_parameters` by `_rope_parameters`
        "rope_theta",
        "partial_rotary_factor",
        "rope_scaling",
    }
)
_TOP_UNUSED = frozenset(
    {
        "model_type",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "tie_word_embeddings",
        "text_config",
        "vision_config",
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "quantization",
        "quantization_config",
        "_name_or_path",
        "use_cache",
        "bos_token_id",
        "pad_token_id",
        "eos_token_id",
        "initializer_range",
        "language_model_only",
        "generation_config",  # mlx-vlm's converter copies generation_config.json in here
    }
)
_VISION_UNUSED = frozenset(
    {
        "model_type",
        "initializer_range",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "architectures",
        # checked to be empty in _vision_config: Qwen3.5 has no DeepStack
        "deepstack_visual_indexes",
    }
)
_VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
_ROPE_TYPES = ("default", "yarn")
_ROPE_KEYS = frozenset(
    {
        "rope_type",
        "type",
        "rope_theta",
        "partial_rotary_factor",
        "mrope_section",
        "mrope_interleaved",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "truncate",
        "mscale",
        "mscale_all_dim",
    }
)
MODEL_TYPES = ("qwen3_5", "qwen3_5_text")


class ConfigError(ValueError):
    """A config.json that this package cannot run, with what to do about it."""


# --- What each field read from config.json must hold: field -> rule (None: fine, else the
# problem). JSON null counts as absent everywhere (the default applies).
Rule = Callable[[Any], "str | None"]
# Bounds every size: beyond it no model fits in memory, and shapes overflow.
MAX_SIZE = 1 << 24


def _integer(low: int, high: int = MAX_SIZE) -> Rule:
    def check(value: Any) -> str | None:
        if type(value) is not int or not low <= value <= high:  # type(): true is no integer
            return f"must be an integer from {low} to {high}"
        return None

    return check


def _number(low: float, high: float = math.inf) -> Rule:
    """A finite JSON number with low < value <= high."""

    def check(value: Any) -> str | None:
        if type(value) not in (int, float) or not math.isfinite(value):
            return "must be a finite number"
        if not low < value <= high:
            return f"must be > {low}" + ("" if high == math.inf else f" and <= {high}")
        return None

    return check


def _kind(types: type | tuple[type, ...], description: str) -> Rule:
    def check(value: Any) -> str | None:
        return (
            None
            if type(value) in (types if isinstance(types, tuple) else (types,))
            else f"must be {description}"
        )

    return check


def _list_of(rule: Rule, description: str) -> Rule:
    def check(value: Any) -> str | None:
        if type(value) is not list or any(rule(v) for v in value):
            return f"must be a list of {description}"
        return None

    return check


_SIZE = _integer(1)
_TOKEN_ID = _integer(0)
_BOOL = _kind(bool, "true or false (a JSON boolean, not a string)")
_STRING = _kind(str, "a string")
_OBJECT = _kind(dict, "an object")
_ANY_NUMBER = _number(-math.inf)


def _token_ids(value: Any) -> str | None:
    ok = _TOKEN_ID(value) is None or _list_of(_TOKEN_ID, "")(value) is None
    return None if ok else "must be a token id (integer >= 0) or a list of them"


_TEXT_RULES: dict[str, Rule] = {
    **dict.fromkeys(
        [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "max_position_embeddings",
            "full_attention_interval",
        ],
        _SIZE,
    ),
    "mtp_num_hidden_layers": _integer(0),
    "rms_norm_eps": _number(0, 1),
    "hidden_act": _STRING,
    "output_gate_type": _STRING,
    "attention_bias": _BOOL,
    "tie_word_embeddings": _BOOL,
    "eos_token_id": _token_ids,
    "layer_types": _list_of(_STRING, "strings"),
    "rope_parameters": _OBJECT,
    "rope_scaling": _OBJECT,
    "rope_theta": _number(0),
    "partial_rotary_factor": _number(0, 1),
    "quantization": _OBJECT,
}
_ROPE_RULES: dict[str, Rule] = {
    "rope_theta": _number(0),
    "partial_rotary_factor": _number(0, 1),
    "mrope_section": _list_of(_integer(0), "integers >= 0"),
    "rope_type": _STRING,
    "type": _STRING,
    "factor": _number(0),
    "original_max_position_embeddings": _SIZE,
    "beta_fast": _ANY_NUMBER,
    "beta_slow": _ANY_NUMBER,
    "attention_factor": _number(0),
    "truncate": _BOOL,
    "mrope_interleaved": _BOOL,
}
_TOP_RULES: dict[str, Rule] = {
    "tie_word_embeddings": _BOOL,
    "text_config": _OBJECT,
    "vision_config": _OBJECT,
    "eos_token_id": _token_ids,
    "quantization": _OBJECT,
    **dict.fromkeys(
        ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"],
        _TOKEN_ID,
    ),
}
_VISION_RULES: dict[str, Rule] = {
    **dict.fromkeys(
        [
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "out_hidden_size",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "num_position_embeddings",
        ],
        _SIZE,
    ),
    "hidden_act": _STRING,
    "rope_parameters": _OBJECT,
}
# loading.py's nn.quantize arguments (per-layer entries are checked by MLX)
_QUANTIZATION_RULES: dict[str, Rule] = {
    "group_size": _SIZE,
    "bits": _integer(1, 8),
    "mode": _STRING,
}


def _check_fields(fields: dict[str, Any], rules: dict[str, Rule], where: str) -> None:
    for name, rule in rules.items():
        value = fields.get(name)
        problem = None if value is None else rule(value)
        if problem:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ConfigError(
                f"config.json{where}: {name} = {shown} {problem}; correct it in "
                "config.json (or download it again)"
            )


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields that hold a value: JSON null means absent (the default applies)."""
    return {k: v for k, v in fields.items() if v is not None}


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
    mtp_num_hidden_layers: int = 1  # decoder layers of the MTP head, when the checkpoint has one
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

        check(
            len(self.layer_types) == self.num_hidden_layers,
            f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
            f"{self.num_hidden_layers}; make them agree",
        )
        bad = sorted(set(self.layer_types) - {LINEAR, FULL})
        check(not bad, f"unknown layer_types {bad}; expected {LINEAR!r} or {FULL!r}")
        check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_attention_heads must be a multiple of num_key_value_heads",
        )
        check(
            self.linear_num_value_heads % self.linear_num_key_heads == 0,
            "linear_num_value_heads must be a multiple of linear_num_key_heads",
        )
        check(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (silu)")
        check(not self.attention_bias, "attention_bias=true is not supported by Qwen3.5")
        check(
            self.rope.rope_type in _ROPE_TYPES,
            f"rope_type {self.rope.rope_type!r} is not supported; use one of {_ROPE_TYPES}",
        )
        check(
            self.rotary_dim >= 2,
            f"head_dim {self.head_dim} * partial_rotary_factor "
            f"{self.rope.partial_rotary_factor} leaves no rotary dims; raise either",
        )
        check(
            sum(self.rope.mrope_section) * 2 == self.rotary_dim,
            f"mrope_section {list(self.rope.mrope_section)} must sum to rotary dim / 2 = "
            f"{self.rotary_dim // 2}",
        )
        if self.rope.rope_type == "yarn":
            check(
                self.rope.factor > 1 and self.rope.original_max_position_embeddings,
                "yarn rope needs factor > 1 and original_max_position_embeddings",
            )


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (docs/ARCHITECTURE.md §1.3, §4)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"  # the blocks' MLP; the merger's GELU is always exact
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch (C, Tp, P, P) as the processor writes it."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        """Side of the square learned position grid."""
        return math.isqrt(self.num_position_embeddings)

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"config.json vision_config: {message}")

        for name in ("patch_size", "temporal_patch_size", "spatial_merge_size"):
            check(
                isinstance(getattr(self, name), int),
                f"{name} must be a single integer, got {getattr(self, name)!r}",
            )
        check(self.hidden_size % self.num_heads == 0, "hidden_size must be a multiple of num_heads")
        check(
            self.head_dim % 4 == 0,
            f"head dim {self.head_dim} must be a multiple of 4 "
            "(the 2-D rotary splits it into row and column halves of rotate-half pairs)",
        )
        check(
            self.grid_side**2 == self.num_position_embeddings,
            f"num_position_embeddings {self.num_position_embeddings} must be a square "
            "(the learned positions form a square grid)",
        )
        check(
            self.hidden_act in _VISION_ACTIVATIONS,
            f"hidden_act {self.hidden_act!r} is not supported; use one of {_VISION_ACTIVATIONS}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """The whole checkpoint config: the text decoder, the vision tower, the token ids."""

    model_type: str
    text: TextConfig
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    vision: VisionConfig | None = None  # None: a text-only checkpoint
    token_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a parsed `config.json`; raises ConfigError naming any problem."""
        if not isinstance(config, dict):
            raise ConfigError(
                f"config.json: holds a JSON {type(config).__name__}, not an object of "
                "fields; this is not a model config, download it again"
            )
        raw, config = config, _present(config)
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not a Qwen3.5 model "
                f"(expected one of {MODEL_TYPES}); qwen35-mlx runs Qwen3.5 checkpoints only"
            )
        if model_type == "qwen3_5":
            _reject_unknown(config, _TOP_UNUSED, "")
            _check_fields(config, _TOP_RULES, "")
            if "text_config" not in config:
                raise ConfigError("config.json: model_type 'qwen3_5' needs a 'text_config' object")
            text_fields = _present(config["text_config"])
        else:
            text_fields = config
        # HF ties the conditional-generation head on the top-level flag only.
        tie = config.get("tie_word_embeddings", False)
        _check_quantization(config.get("quantization"))
        text = _text_config(text_fields, " text_config" if text_fields is not config else "")
        eos = text_fields.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        token_ids = {
            k: config[k]
            for k in (
                "image_token_id",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
            )
            if k in config
        }
        _check_token_ids({**token_ids, "eos_token_id": eos_ids}, text.vocab_size)
        vision = _vision_config(config.get("vision_config"))
        if vision is not None and vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"config.json: vision_config.out_hidden_size {vision.out_hidden_size} must equal "
                f"the text hidden_size {text.hidden_size} (features replace token embeddings)"
            )
        return cls(
            model_type=model_type,
            text=text,
            tie_word_embeddings=tie,
            eos_token_ids=eos_ids,
            vision=vision,
            token_ids=token_ids,
            raw=raw,
        )


def _check_quantization(quantization: dict[str, Any] | None) -> None:
    if quantization is not None:
        _check_fields(quantization, _QUANTIZATION_RULES, " quantization")
        missing = [k for k in ("group_size", "bits") if k not in quantization]
        if missing:
            raise ConfigError(
                f"config.json: quantization lacks {missing}; the converter that "
                "wrote it is not supported, convert the checkpoint again"
            )


def _check_token_ids(token_ids: dict[str, int | tuple[int, ...]], vocab_size: int) -> None:
    for name, ids in token_ids.items():
        outside = [i for i in (ids if isinstance(ids, tuple) else (ids,)) if i >= vocab_size]
        if outside:
            raise ConfigError(
                f"config.json: {name} {outside} is outside the vocabulary "
                f"(vocab_size {vocab_size}); correct it in config.json"
            )


def _reject_unknown(fields: dict[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"config.json{where}: unknown field(s) {unknown}. qwen35-mlx does not know what they "
            "change; if they are harmless metadata, remove them from config.json, otherwise "
            "this checkpoint is not a plain Qwen3.5 model"
        )


def _text_config(fields: dict[str, Any], where: str) -> TextConfig:
    names = {f.name for f in dataclasses.fields(TextConfig)} - {"rope", "layer_types"}
    _reject_unknown(
        fields, frozenset(names) | _TEXT_UNUSED | {"layer_types", "rope_parameters"}, where
    )
    _check_fields(fields, _TEXT_RULES, where)
    required = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
    ]
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
        layer_types = [
            FULL if (i + 1) % interval == 0 else LINEAR for i in range(fields["num_hidden_layers"])
        ]
    config = TextConfig(layer_types=tuple(layer_types), rope=_rope_parameters(fields), **values)
    config.validate()
    return config


def _vision_config(fields: dict[str, Any] | None) -> VisionConfig | None:
    if fields is None:
        return None
    fields = _present(fields)
    names = {f.name for f in dataclasses.fields(VisionConfig)} - {"rope_theta"}
    _reject_unknown(
        fields, frozenset(names) | _VISION_UNUSED | {"rope_parameters"}, " vision_config"
    )
    _check_fields(fields, _VISION_RULES, " vision_config")
    if fields.get("deepstack_visual_indexes"):
        raise ConfigError(
            "config.json vision_config: deepstack_visual_indexes "
            f"{fields['deepstack_visual_indexes']} is not supported (Qwen3.5 has "
            "no DeepStack); this checkpoint is not a Qwen3.5 model"
        )
    required = ["depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"]
    missing = [k for k in required if k not in fields]
    if missing:
        raise ConfigError(f"config.json: missing required vision_config field(s) {missing}")
    rope = _present(fields.get("rope_parameters", {}))
    _check_fields(
        rope, {"rope_theta": _number(0), "rope_type": _STRING}, " vision_config rope_parameters"
    )
    unknown = sorted(set(rope) - {"rope_type", "rope_theta"})
    if unknown or rope.get("rope_type", "axial") != "axial":
        raise ConfigError(
            f"config.json vision_config: rope_parameters {rope} not supported; "
            "Qwen3.5's vision tower uses {rope_type: axial, rope_theta}"
        )
    values = {k: fields[k] for k in names if k in fields}
    config = VisionConfig(rope_theta=float(rope.get("rope_theta", 10_000.0)), **values)
    config.validate()
    return config


def _rope_parameters(fields: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; 4.x files used rope_theta + rope_scaling.
    params = _present(fields.get("rope_scaling", {}))
    params.update(_present(fields.get("rope_parameters", {})))
    for legacy in ("rope_theta", "partial_rotary_factor"):
        if legacy in fields:
            params.setdefault(legacy, fields[legacy])
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"config.json: unknown rope_parameters field(s) {unknown}")
    _check_fields(params, _ROPE_RULES, " rope_parameters")
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
        truncate=params.get("truncate", True),
    )
