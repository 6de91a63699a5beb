"""`convert`: load a Hugging Face checkpoint, optionally quantize it, write an MLX checkpoint.

The weight transforms are those of `qwen35_mlx.loading` (done once, at load); this module only
decides what to quantize, writes the result safely (`writer.py`) and checks it (`verify.py`).
The output keeps the whole model, vision tower and MTP head included, in the layout mlx-lm and
mlx-vlm read. Weights stay lazy until the writer evaluates them one output shard at a time
(`lazy.py`), so memory holds about one shard, not the whole model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen35_mlx.loading import is_converted, load_model, read_config, resolve
from qwen35_mlx.models.model import QUANT_RECIPES, Model
from qwen35_mlx.tokenizer import Tokenizer

from .card import model_card
from .dequantize import dequantize_modules
from .upload import upload
from .verify import print_report, quantization_errors, verify
from .writer import check_target, write_checkpoint

BITS = (4, 6, 8)
GROUP_SIZES = (32, 64, 128)
# Verification fails past these logit relative errors. Float conversions only round (~1e-2 for
# bfloat16); quantized random-weight models reach ~0.7 at 4 bits (`bench convert`), real ones
# less; past 1.0 the logits are no closer to the source's than zeros are: a broken conversion.
MAX_LOGIT_ERROR = {"float": 0.1, "quantized": 1.0}


class ConvertError(ValueError):
    """A conversion that cannot be done as asked, with what to do instead."""


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    recipe: str = "hybrid",
    dtype: str | None = None,
    quantize_vision: bool = False,
    quantize_mtp: bool = False,
    dequantize: bool = False,
    force: bool = False,
    verify_output: bool = True,
    report: bool = False,
    upload_repo: str | None = None,
    revision: str | None = None,
) -> Path:
    """Convert a checkpoint; returns the output directory.

    Args:
        hf_path: Hugging Face repo id or local checkpoint directory.
        mlx_path: output directory (must not exist unless `force`).
        quantize, q_bits, q_group_size: affine quantization at 4, 6 or 8 bits, groups of 32,
            64 or 128.
        recipe: "hybrid" (architecture-aware, default) or "uniform" (every matrix at q_bits);
            see `Model.quant_predicate`.
        dtype: float dtype of what is not quantized ("float32", "bfloat16", "float16");
            default: the source's. Norms and A_log stay float32.
        quantize_vision, quantize_mtp: also quantize the vision tower / MTP head matrices
            (kept float by default).
        dequantize: turn a quantized MLX checkpoint back into float weights.
        force: replace an existing output directory.
        verify_output: load the result and compare its logits with the source's.
        report: print the per-tensor quantization error table (holds the float matrices
            while converting: more memory).
        upload_repo: upload the result to this Hugging Face repo, once verified.
    """
    _check_options(quantize, q_bits, q_group_size, recipe, dequantize, verify_output, upload_repo)
    target = Path(mlx_path)
    source = resolve(hf_path, revision)
    _check_apart(target, source)
    check_target(target, force)
    config = read_config(source)
    quantized_source = bool(config.raw.get("quantization"))
    if is_converted(source) and not dequantize:
        raise ConvertError(
            f"{source} is already a converted MLX checkpoint; converting it again would "
            "transform its weights twice. Load it directly, or pass --dequantize for float weights"
        )
    if dequantize and not quantized_source:
        raise ConvertError(f"{source} is not quantized; there is nothing to dequantize")

    start = time.perf_counter()
    model = load_model(source, dtype=dtype, lazy=True)
    quant_config, rows = None, []
    if dequantize:
        dequantize_modules(model)
    elif quantize:
        float_weights = _matrices(model) if report else {}
        quant_config = _quantize(model, recipe, q_bits, q_group_size, quantize_vision, quantize_mtp)
        rows = quantization_errors(float_weights, model)
        del float_weights
    weights = dict(tree_flatten(model.parameters()))
    del model  # `weights` alone holds the arrays now: the writer frees each shard once written
    write_checkpoint(
        target,
        weights,
        _output_config(config.raw, quant_config),
        source,
        model_card(hf_path, quant_config, recipe, quantize_vision, quantize_mtp, dtype),
        force,
    )
    print(
        f"[convert] wrote {target} ({_size(target) / 1e9:.3f} GB) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    if rows:
        print_report(rows)
    if verify_output:
        _check_verified(
            target, *verify(source, target, Tokenizer.from_pretrained(source)), dtype, quantize
        )
    if upload_repo:
        upload(target, upload_repo)
    return target


def _check_options(
    quantize, bits, group_size, recipe, dequantize, verify_output, upload_repo
) -> None:
    if quantize and dequantize:
        raise ConvertError("--quantize and --dequantize exclude each other; choose one")
    if upload_repo and not verify_output:
        raise ConvertError("--upload-repo uploads only a verified checkpoint; drop --no-verify")
    if bits not in BITS:
        raise ConvertError(f"--q-bits {bits} is not supported; use one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise ConvertError(
            f"--q-group-size {group_size} is not supported; use one of {GROUP_SIZES}"
        )
    if recipe not in QUANT_RECIPES:
        raise ConvertError(f"--recipe {recipe!r} is not known; use one of {QUANT_RECIPES}")


def _check_apart(target: Path, source: Path) -> None:
    """The output must not overlap the source: --force would delete it, and verification would
    compare the output with itself."""
    out, src = target.resolve(), source.resolve()  # symlinks resolved
    if out == src:
        problem = "is the source checkpoint"
    elif out in src.parents:
        problem = "contains the source checkpoint"
    elif src in out.parents:
        problem = "lies inside the source checkpoint"
    else:
        return
    raise ConvertError(
        f"--mlx-path {target} {problem} {source}; writing there could overwrite "
        "or delete the weights being converted. Choose an --mlx-path apart from "
        "it: not the source, not a folder above it, not one inside it"
    )


def _check_verified(
    target: Path, relative_error: float, kl: float, dtype: str | None, quantized: bool
) -> None:
    limit = MAX_LOGIT_ERROR["quantized" if quantized else "float"]
    if math.isfinite(relative_error) and relative_error <= limit:
        return
    fix = (
        "float16 overflows on Qwen3.5 activations: convert with --dtype bfloat16 or float32"
        if dtype == "float16"
        else "convert with more --q-bits, or check the source"
    )
    raise ConvertError(
        f"verification failed: the converted model's logits are {relative_error:.3e} (relative "
        f"error; at most {limit} passes) from the source's, KL {kl:.3e}. {target} was "
        f"written for inspection but not uploaded; {fix}"
    )


def _quantize(
    model: Model, recipe: str, bits: int, group_size: int, vision: bool, mtp: bool
) -> dict:
    """Quantizes in place; returns the config's `quantization` block (per-layer overrides
    for every layer whose settings differ from the top level, which mlx-vlm needs)."""
    decide = Model.quant_predicate(recipe, bits, group_size, vision=vision, mtp=mtp)
    overrides = {}

    def predicate(path: str, module) -> bool | dict:
        decision = decide(path, module)
        if isinstance(decision, dict):
            overrides[path] = dict(decision)
            return dict(decision)  # a copy: nn.quantize consumes it
        return decision

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}


def _matrices(model: Model) -> dict[str, mx.array]:
    return {
        name: module.weight
        for name, module in model.named_modules()
        if hasattr(module, "to_quantized")
    }


def _output_config(raw: dict, quantization: dict | None) -> dict:
    config = copy.deepcopy(raw)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # the key transformers-style readers use
    return json.loads(json.dumps(config))


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
