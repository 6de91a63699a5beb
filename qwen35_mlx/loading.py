"""Loading checkpoints: Hugging Face directories or repo ids, and converted MLX directories.

The layout is decided from what the files say, never from tensor shapes: `config.json`'s
model_type names the Hugging Face layout (`Qwen3_5ForConditionalGeneration` keys
`model.language_model.*`, text-only `Qwen3_5ForCausalLM` keys `model.*`), and a converted
checkpoint carries the safetensors metadata {"format": "mlx"}. Hugging Face weights are
turned into run-time form once, in `hf_to_mlx`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models.config import ConfigError, ModelConfig
from .models.model import Model
from .processor import Processor
from .tokenizer import Tokenizer

MLX_FORMAT = {"format": "mlx"}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
# Tensors of a later stage (the MTP head): kept, not loaded into the model.
PENDING_PREFIXES = ("mtp.",)
VISION_PREFIX = "vision_tower."
# (1+w) RMSNorm weights (transformers stores w), the MTP head's included; the gated norm
# `linear_attn.norm` (plain w) and the vision tower's LayerNorms are not among them.
SHIFTED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                 "k_norm.weight", "model.norm.weight", "mtp.norm.weight",
                 "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the file at fault and what to do."""


def load(path_or_repo: str | Path, *, dtype: str | None = None, revision: str | None = None,
         processor_options: Mapping | None = None):
    """Load a Qwen3.5 model and its tokenizer.

    Args:
        path_or_repo: a local checkpoint directory (Hugging Face or converted MLX) or a
            Hugging Face repo id such as "Qwen/Qwen3.5-0.8B".
        dtype: "float32", "bfloat16" or "float16" for the weights; default: the checkpoint's.
        revision: hub revision when a repo id is given.
        processor_options: settings of the image/video processor over the checkpoint's, e.g.
            {"max_pixels": 1024 * 1024} (at most 1024 tokens per image) or {"fps": 1}; see
            `qwen35_mlx.processor.Processor`.

    Returns:
        (model, tokenizer). For a checkpoint with a vision tower, `tokenizer.processor` is its
        image and video processor (as a Hugging Face processor wraps the tokenizer).
    """
    directory = resolve(path_or_repo, revision)
    model, tokenizer = load_model(directory, dtype=dtype), Tokenizer.from_pretrained(directory)
    if model.vision_tower is not None:
        tokenizer.processor = Processor.from_pretrained(directory, **(processor_options or {}))
    return model, tokenizer


def resolve(path_or_repo: str | Path, revision: str | None = None) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{name}: not a checkpoint directory and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download  # only needed for hub ids
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        raise CheckpointError(
            f"{name}: cannot download from the Hugging Face hub ({error}); check the repo id "
            "and the network, or pass a local checkpoint directory") from None


def read_config(directory: Path) -> ModelConfig:
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(
            f"{file} not found: {directory} is not a checkpoint directory. Point to a folder "
            "with config.json, the *.safetensors weights and the tokenizer files")
    try:
        return ModelConfig.from_hf(json.loads(file.read_text()))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); re-download it") from None
    except ConfigError as error:
        raise CheckpointError(f"{directory}: {error}") from None


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(
                f"{index} is not a valid safetensors index (JSON with a 'weight_map'); "
                "download it again") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        raise CheckpointError(
            f"{directory}: no model.safetensors or model.safetensors.index.json; the weights "
            "are missing (download them, or point to the right folder)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{directory}: shard(s) {missing} listed in model.safetensors.index.json are "
            "missing; download them again")
    return files


def is_converted(directory: Path) -> bool:
    """Whether the checkpoint carries the MLX format marker; reads one safetensors header."""
    file = weight_files(directory)[0]
    try:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError):
        raise CheckpointError(f"{file}: cannot read its safetensors header; the file is "
                              "truncated or corrupt, download it again") from None
    return (header.get("__metadata__") or {}).get("format") == MLX_FORMAT["format"]


def read_weights(directory: Path) -> tuple[dict[str, mx.array], dict[str, str], bool]:
    """Returns (tensors, tensor name -> file name, whether the checkpoint is converted MLX)."""
    tensors, origin, formats = {}, {}, set()
    for file in weight_files(directory):
        try:
            shard, metadata = mx.load(str(file), return_metadata=True)
        except Exception as error:  # mlx raises RuntimeError/ValueError for corrupt files
            raise CheckpointError(
                f"{file}: cannot be read as safetensors ({error}); the file is truncated or "
                "corrupt, download it again") from None
        formats.add((metadata or {}).get("format"))
        tensors.update(shard)
        origin.update(dict.fromkeys(shard, file.name))
    if len(formats) > 1:
        raise CheckpointError(f"{directory}: shards disagree on their format marker {formats}")
    return tensors, origin, formats == {"mlx"}


def hf_name(name: str, config: ModelConfig) -> str | None:
    """The run-time name of a Hugging Face tensor; None drops it (the tied duplicate head,
    the vision tower's position_ids buffer)."""
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else "language_model.lm_head.weight"
    if name.startswith("mtp."):
        return name
    if name.startswith("model.visual."):
        return None if "position_ids" in name else "vision_tower." + name[len("model.visual."):]
    prefix = "model.language_model." if config.model_type == "qwen3_5" else "model."
    if not name.startswith(prefix):
        raise CheckpointError(
            f"unexpected tensor {name!r}: a {config.model_type} checkpoint keeps its decoder "
            f"under {prefix!r}; config.json and the weights do not belong together")
    return "language_model.model." + name[len(prefix):]


def hf_to_mlx(name: str, value: mx.array) -> mx.array:
    """Hugging Face layout -> run-time layout of one tensor, given its run-time name. The only
    place weights change form; converted checkpoints store the result."""
    if name.endswith("conv1d.weight"):
        return value.swapaxes(1, 2)  # [C, 1, K] -> [C, K, 1]
    if name.endswith("patch_embed.proj.weight"):
        return value.transpose(0, 2, 3, 4, 1)  # Conv3d [O, C, T, P, P] -> [O, T, P, P, C]
    if name.endswith(SHIFTED_NORMS):
        return value.astype(mx.float32) + 1.0  # shifted in float32, never rounded to bf16
    return value


def load_model(directory: str | Path, *, dtype: str | None = None) -> Model:
    """Build the model from a checkpoint directory with strict weight loading."""
    directory = Path(directory)
    config = read_config(directory)
    weights, origin, is_mlx = read_weights(directory)
    if not is_mlx:
        renamed = {k: hf_name(k, config) for k in weights}
        weights = {new: hf_to_mlx(new, weights[old]) for old, new in renamed.items() if new}
        origin = {new: origin[old] for old, new in renamed.items() if new}
    pending = {k: weights.pop(k) for k in list(weights) if k.startswith(PENDING_PREFIXES)}
    if config.vision is not None and not any(k.startswith(VISION_PREFIX) for k in weights):
        # a text-only conversion of a multimodal checkpoint (mlx-lm drops the vision weights
        # and keeps vision_config): load the text model
        config = dataclasses.replace(config, vision=None)

    model = Model(config)
    quantization = config.raw.get("quantization")
    if quantization:
        def quantized(path: str, _) -> bool | dict:
            if f"{path}.scales" not in weights:
                return False
            # mlx-lm's mixed-precision recipes write per-layer params under the module path
            params = quantization.get(path)
            return dict(params) if isinstance(params, dict) else True  # a copy: mlx edits it

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    mode=quantization.get("mode", "affine"), class_predicate=quantized)
    _check_weights(model, weights, origin, directory)
    target_dtype = _dtype(dtype, config)
    model.load_weights(list(_cast(weights, target_dtype).items()), strict=True)
    model.set_pending_weights(_cast(pending, target_dtype))
    mx.eval(model.parameters())
    return model


def _dtype(name: str | None, config: ModelConfig) -> mx.Dtype | None:
    name = name or config.raw.get("dtype") or config.raw.get("torch_dtype")
    if name is None:
        return None  # keep the tensors' own dtypes
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    def cast(name: str, value: mx.array) -> mx.array:
        if not mx.issubdtype(value.dtype, mx.floating):
            return value  # quantized weights (uint32)
        if not Model.cast_predicate(name):
            return value.astype(mx.float32)
        return value if dtype is None else value.astype(dtype)

    return {name: cast(name, value) for name, value in weights.items()}


def _check_weights(model: Model, weights: dict[str, mx.array], origin: dict[str, str],
                   directory: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
            f"{missing[:3]}; the download is incomplete or config.json describes another model")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} tensor(s) the model has no place for, e.g. "
            f"{unexpected[:3]}; config.json does not match the weights")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{directory / origin.get(name, '?')}: tensor {name!r} has shape "
                f"{tuple(value.shape)} but config.json implies {tuple(expected[name].shape)}; "
                "the weights and config.json do not belong together")
