"""Loading checkpoints: Hugging Face directories or repo ids, and converted MLX directories.

The layout is decided from what the files say, never from tensor shapes: `config.json`'s
model_type names the Hugging Face layout (`Qwen3_5ForConditionalGeneration` keys
`model.language_model.*`, text-only `Qwen3_5ForCausalLM` keys `model.*`), and a converted
checkpoint carries the safetensors metadata {"format": "mlx"}. Hugging Face weights are
turned into run-time form once, in `hf_to_mlx`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError
from .models.config import ConfigError, ModelConfig
from .models.model import Model
from .tokenizer import Tokenizer

MLX_FORMAT = {"format": "mlx"}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
# The MTP head's tensors (`Model.mtp`, docs/ARCHITECTURE.md §6); read on first use.
MTP_PREFIX = "mtp."
VISION_PREFIX = "vision_tower."
# (1+w) RMSNorm weights (transformers stores w), the MTP head's included; the gated norm
# `linear_attn.norm` (plain w) and the vision tower's LayerNorms are not among them.
SHIFTED_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
    "model.norm.weight",
    "mtp.norm.weight",
    "pre_fc_norm_embedding.weight",
    "pre_fc_norm_hidden.weight",
)
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# Bytes per element of the safetensors dtypes MLX reads.
SAFETENSORS_ITEM_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


def load(
    path_or_repo: str | Path,
    *,
    dtype: str | None = None,
    revision: str | None = None,
    processor_options: Mapping | None = None,
):
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
        image and video processor (as a Hugging Face processor wraps the tokenizer). The model
        serves any thread; its vision tower's and MTP head's weights are read on first use.

    Raises:
        CheckpointError: a checkpoint that cannot be loaded, naming the file and the fix (a
            missing file is also a FileNotFoundError).
    """
    directory = resolve(path_or_repo, revision)
    read_config(directory)  # a folder that is no checkpoint at all is said so first
    tokenizer = Tokenizer.from_pretrained(directory)  # then it: it fails faster than the weights
    model = load_model(directory, dtype=dtype)
    if model.vision_tower is not None:
        from .processor import Processor  # here: PIL is needed for vision checkpoints only

        tokenizer.processor = Processor.from_pretrained(directory, **(processor_options or {}))
    return model, tokenizer


def resolve(path_or_repo: str | Path, revision: str | None = None) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{name}: not a checkpoint directory and not a Hugging Face repo id (owner/name)"
        )
    from huggingface_hub import snapshot_download  # only needed for hub ids
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        raise CheckpointError(
            f"{name}: cannot download from the Hugging Face hub ({error}); check the repo id "
            "and the network, or pass a local checkpoint directory"
        ) from None


def read_config(directory: Path) -> ModelConfig:
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(
            f"{file} not found: {directory} is not a checkpoint directory. Point to a folder "
            "with config.json, the *.safetensors weights and the tokenizer files"
        )
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{file} is not UTF-8 text ({error}); re-download it") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); re-download it") from None
    try:
        return ModelConfig.from_hf(fields)
    except ConfigError as error:  # its message starts with "config.json"
        raise CheckpointError(f"{directory}: {error}") from None


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_weight_map(index).values()))
        files = [_shard_path(directory, index, name) for name in names]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        raise CheckpointError(
            f"{directory}: no model.safetensors or model.safetensors.index.json; the weights "
            "are missing (download them, or point to the right folder)"
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{directory}: shard(s) {missing} listed in model.safetensors.index.json are "
            "missing; download them again"
        )
    return files


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError):  # ValueError: not JSON, or not UTF-8
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index} is not a valid safetensors index (JSON with a 'weight_map' of tensor "
            "name -> shard file name); download it again"
        )
    return weight_map


def _shard_path(directory: Path, index: Path, name: str) -> Path:
    """The shard `name` of the index: a .safetensors file inside the checkpoint folder."""
    # Checked on the normalized path, not resolve()d: a hub snapshot's files are symlinks
    # into the cache's blobs folder, and those are the folder's own files.
    root = os.path.abspath(directory)
    path = os.path.normpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, path]) != root:
        raise CheckpointError(
            f"{index}: shard {name!r} lies outside {directory}; an index may only name files "
            "in its own folder. Download model.safetensors.index.json again"
        )
    if not name.endswith(".safetensors"):
        raise CheckpointError(
            f"{index}: shard {name!r} is not a .safetensors file, the only weight format read. "
            "Download model.safetensors.index.json again, or convert the weights to safetensors"
        )
    return directory / os.path.relpath(path, root)


def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file (an 8-byte little-endian length, then JSON),
    checked against the file: each tensor's bytes lie in the data section, match its dtype
    and shape, and belong to no other tensor; no name appears twice."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            size = os.fstat(f.fileno()).st_size
            if not 2 <= length <= size - 8:
                raise ValueError(f"header length {length} does not fit the {size}-byte file")
            header = json.loads(f.read(length), object_pairs_hook=_refuse_repeated_names)
    except (OSError, ValueError) as error:  # ValueError: bad JSON, repeated names, bad UTF-8
        raise _unreadable(file, error) from None
    _check_layout(file, header, size - 8 - length)
    return header


def _refuse_repeated_names(pairs: list[tuple[str, object]]) -> dict:
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # json.loads would keep the last silently
        raise ValueError(f"the header names {repeated[:3]} more than once")
    return dict(pairs)


def _unreadable(file: Path, problem: object) -> CheckpointError:
    return CheckpointError(
        f"{file}: cannot be read as safetensors ({problem}); the file is "
        "truncated or corrupt, download it again"
    )


def _check_layout(file: Path, header: object, data_size: int) -> None:
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise _unreadable(file, "its header is not a JSON object with an object __metadata__")
    spans = sorted(
        _span(file, name, entry, data_size)
        for name, entry in header.items()
        if name != "__metadata__"
    )
    spans = [span for span in spans if span[0] < span[1]]  # empty tensors own no bytes
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise _unreadable(file, f"tensors {name!r} and {other!r} share data bytes")


def _span(file: Path, name: str, entry: object, data_size: int) -> tuple[int, int, str]:
    """(first byte, end byte, name) of one tensor in the data section."""
    fields = _entry_fields(entry)
    if fields is None:
        raise _unreadable(file, f"tensor {name!r} has no valid dtype, shape and data_offsets")
    start, end, shape, item_size = fields
    if not start <= end <= data_size:
        raise _unreadable(
            file,
            f"tensor {name!r} has data_offsets [{start}, {end}] outside the {data_size} data bytes",
        )
    if end - start != math.prod(shape) * item_size:
        raise _unreadable(
            file,
            f"tensor {name!r} holds {end - start} bytes but its dtype "
            f"{entry['dtype']} and shape {shape} need "
            f"{math.prod(shape) * item_size}",
        )
    return start, end, name


def _entry_fields(entry: object) -> tuple[int, int, list[int], int] | None:
    """(start, end, shape, item size) of a header entry; None if any is malformed."""
    try:
        start, end = entry["data_offsets"]
        shape, item_size = list(entry["shape"]), SAFETENSORS_ITEM_SIZES[entry["dtype"]]
    except (KeyError, TypeError, ValueError):
        return None
    if not all(type(v) is int and v >= 0 for v in (start, end, *shape)):
        return None
    return start, end, shape, item_size


def _format(header: dict) -> str | None:
    return header.get("__metadata__", {}).get("format")


def is_converted(directory: Path) -> bool:
    """Whether the checkpoint carries the MLX format marker; reads one safetensors header."""
    return _format(read_header(weight_files(directory)[0])) == MLX_FORMAT["format"]


def read_weights(directory: Path) -> tuple[dict[str, mx.array], dict[str, str], bool]:
    """Returns (tensors, tensor name -> file name, whether the checkpoint is converted MLX).
    The tensors are lazy: only what is evaluated is read from disk."""
    tensors, origin, formats = {}, {}, set()
    for file in weight_files(directory):
        formats.add(_format(read_header(file)))
        shard = _load_shard(file)
        repeated = sorted(set(shard) & set(origin))
        if repeated:
            raise CheckpointError(
                f"{file}: tensor(s) {repeated[:3]} are also stored in {origin[repeated[0]]}; a "
                "checkpoint holds each tensor once (mixed downloads?), download it again"
            )
        tensors.update(shard)
        origin.update(dict.fromkeys(shard, file.name))
    if len(formats) > 1:
        raise CheckpointError(f"{directory}: shards disagree on their format marker {formats}")
    return tensors, origin, formats == {"mlx"}


def _load_shard(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except Exception as error:  # mlx raises RuntimeError/ValueError for corrupt files
        raise _unreadable(file, error) from None


def hf_name(name: str, config: ModelConfig) -> str | None:
    """The run-time name of a Hugging Face tensor; None drops it (the tied duplicate head,
    the vision tower's position_ids buffer)."""
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else "language_model.lm_head.weight"
    if name.startswith(MTP_PREFIX):
        return name
    if name.startswith("model.visual."):
        return None if "position_ids" in name else "vision_tower." + name[len("model.visual.") :]
    prefix = "model.language_model." if config.model_type == "qwen3_5" else "model."
    if not name.startswith(prefix):
        raise CheckpointError(
            f"unexpected tensor {name!r}: a {config.model_type} checkpoint keeps its decoder "
            f"under {prefix!r}; config.json and the weights do not belong together"
        )
    return "language_model.model." + name[len(prefix) :]


def hf_to_mlx(name: str, value: mx.array) -> mx.array:
    """Hugging Face layout -> run-time layout of one tensor, given its run-time name. The only
    place weights change form; converted checkpoints store the result."""
    if name.endswith("conv1d.weight"):
        return value.swapaxes(1, 2)  # [C, 1, K] -> [C, K, 1]
    if name.endswith("patch_embed.proj.weight"):
        return value.transpose(0, 2, 3, 4, 1)  # Conv3d [O, C, T, P, P] -> [O, T, P, P, C]
    if name.endswith(SHIFTED_NORMS):
        # one op: adding a float32 1 promotes, so the shift is done in float32, never in bf16
        return value + mx.array(1.0, dtype=mx.float32)
    return value


def run_time_weights(directory: Path, config: ModelConfig) -> tuple[dict, dict[str, str]]:
    """(run-time name -> lazy tensor, run-time name -> file name) of a checkpoint."""
    weights, origin, is_mlx = read_weights(directory)
    if is_mlx:
        return weights, origin
    renamed = {k: hf_name(k, config) for k in weights}
    return (
        {new: hf_to_mlx(new, weights[old]) for old, new in renamed.items() if new},
        {new: origin[old] for old, new in renamed.items() if new},
    )


def load_model(directory: str | Path, *, dtype: str | None = None, lazy: bool = False) -> Model:
    """Build the model from a checkpoint directory with strict weight loading. The text
    decoder is read now; the vision tower and the MTP head on first use (both are checked
    against the model now, from the safetensors headers). With `lazy`, no tensor data is
    read: every weight stays on disk until evaluated (conversion writes shard by shard from
    such a model)."""
    directory = Path(directory)
    config = read_config(directory)
    target_dtype = _dtype(dtype, config)
    weights, origin = run_time_weights(directory, config)
    if config.vision is not None and not any(k.startswith(VISION_PREFIX) for k in weights):
        # a text-only conversion of a multimodal checkpoint (mlx-lm drops the vision weights
        # and keeps vision_config): load the text model
        config = dataclasses.replace(config, vision=None)

    model = Model(config, mtp=any(k.startswith(MTP_PREFIX) for k in weights))
    _quantize(model, config, weights)
    _check_mtp_head(model, weights, directory)
    _check_weights(model, weights, origin, directory)
    # strict=False: _check_weights has done mlx's strict checks, with file names
    model.load_weights(list(_cast(weights, target_dtype).items()), strict=False)
    model.fingerprint = weights_fingerprint(directory, model.fingerprint, target_dtype)
    if lazy:
        return model
    if model.vision_tower is not None:
        model.defer_vision_weights(
            lambda: _part_weights(directory, config, target_dtype, VISION_PREFIX)
        )
    if model.mtp is not None:
        model.mtp.defer_weights(lambda: _part_weights(directory, config, target_dtype, MTP_PREFIX))
    mx.eval(model.language_model.parameters())
    # the first model on a Mac self-tests the kernels (docs/ARCHITECTURE.md §8.1); imported
    # here as autotune brings numpy and PIL, which `import qwen35_mlx` does without
    if mx.metal.is_available():
        from .gated_delta.autotune import ensure_tuned

        ensure_tuned()
    return model


FINGERPRINT_SAMPLE = 1 << 16  # bytes read from each end of each shard


def weights_fingerprint(directory: Path, config_fingerprint: str, dtype: mx.Dtype | None) -> str:
    """What cached states of this model are tied to: its config, the dtype it runs in, and for
    each shard its name, size, header and the bytes at both ends of its data (cheap, and it
    tells apart two fine-tunes of one architecture)."""
    digest = hashlib.sha256(f"{config_fingerprint} {dtype}".encode())
    for file in weight_files(directory):
        size = file.stat().st_size
        with open(file, "rb") as f:
            header = f.read(int.from_bytes(f.read(8), "little"))
            ends = f.read(FINGERPRINT_SAMPLE)
            f.seek(max(size - FINGERPRINT_SAMPLE, f.tell()))
            ends += f.read(FINGERPRINT_SAMPLE)
        digest.update(f"{file.name} {size}".encode() + header + ends)
    return digest.hexdigest()


def _part_weights(
    directory: Path, config: ModelConfig, dtype: mx.Dtype | None, prefix: str
) -> dict[str, mx.array]:
    """The run-time tensors of one part of the model (the vision tower, the MTP head) under
    the part's own names, as new lazy arrays."""
    weights, _ = run_time_weights(directory, config)
    part = {k: v for k, v in weights.items() if k.startswith(prefix)}
    return {k[len(prefix) :]: v for k, v in _cast(part, dtype).items()}


def _quantize(model: Model, config: ModelConfig, weights: Mapping[str, mx.array]) -> None:
    """Quantize the layers that the checkpoint stores quantized (they have `.scales`)."""
    quantization = config.raw.get("quantization")
    if not quantization:
        return

    def quantized(path: str, _) -> bool | dict:
        if f"{path}.scales" not in weights:
            return False
        # mlx-lm's mixed-precision recipes write per-layer params under the module path
        params = quantization.get(path)
        return dict(params) if isinstance(params, dict) else True  # a copy: mlx edits it

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=quantized,
    )


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
        target = dtype if Model.cast_predicate(name) else mx.float32
        # astype to the same dtype would still add a copy to the graph
        return value if target is None or target == value.dtype else value.astype(target)

    return {name: cast(name, value) for name, value in weights.items()}


def _check_weights(
    model: Model, weights: dict[str, mx.array], origin: dict[str, str], directory: Path
) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
            f"{missing[:3]}; the download is incomplete or config.json describes another model"
        )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} tensor(s) the model has no place for, e.g. "
            f"{unexpected[:3]}; config.json does not match the weights"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{directory / origin.get(name, '?')}: tensor {name!r} has shape "
                f"{tuple(value.shape)} but config.json implies {tuple(expected[name].shape)}; "
                "the weights and config.json do not belong together"
            )
        _check_dtype(name, value.dtype, expected[name].dtype, directory / origin.get(name, "?"))


def _check_dtype(name: str, stored: mx.Dtype, expected: mx.Dtype, file: Path) -> None:
    """Floating where the model holds floating values (any float dtype: it is cast), else
    exactly the model's dtype (uint32 packed quantized weights)."""
    if mx.issubdtype(expected, mx.floating):
        ok, wanted = mx.issubdtype(stored, mx.floating), "a floating-point dtype"
    else:
        ok, wanted = stored == expected, str(expected)
    if not ok:
        raise CheckpointError(
            f"{file}: tensor {name!r} is stored as {stored} but the model needs {wanted}; the "
            "file is corrupt or was written for another model, download it again"
        )


def _check_mtp_head(model: Model, weights: dict[str, mx.array], directory: Path) -> None:
    """An MTP head is whole or absent: name every tensor a partial one lacks."""
    if model.mtp is None:
        return
    expected = {MTP_PREFIX + name for name, _ in tree_flatten(model.mtp.parameters())}
    missing = sorted(expected - set(weights))
    if missing:
        raise CheckpointError(
            f"{directory}: the MTP head is incomplete, {len(missing)} of its "
            f"{len(expected)} tensor(s) are missing: {missing}; download the checkpoint "
            "again, or remove every mtp.* tensor to load the model without the head"
        )
