"""Memory planner: what a checkpoint needs at a context length, before loading anything.

For a checkpoint directory (config.json and the safetensors headers; no tensor data is read)
or a known size name ("0.8B", "2B", "4B", "9B": the released bf16 layout of
`bench.random_checkpoint`), at batch 1:

- weights: the bytes of every tensor, from the headers' data offsets (quantized checkpoints
  included: packed weights, scales and biases are tensors like any other), split into the text
  decoder, the vision tower and the MTP head. These are the bytes on disk; loading keeps the
  decoder's norms and A_log in float32, which adds 2 bytes per norm element of a bf16
  checkpoint (a few hundred KB).
- KV cache: full-attention layers only, 2 (keys, values) · layers_full · Hkv · head_dim ·
  capacity · bytes per element, where the capacity is the context rounded up to the cache's
  block of `KVCache.step` tokens (the cache grows a block at a time). At 16 bits an element
  takes the activation dtype's bytes; at 8 or 4 bits, `bits / 8` bytes plus one scale and one
  bias (activation dtype) per `kv_group_size` elements, as MLX's quantized arrays hold them.
- DeltaNet state: per DeltaNet layer, the conv state [K-1, conv_dim] in the activation dtype
  and the recurrent state [Hv, Dv, Dk] in float32; constant in the context length.
- prefill peak: the transient arrays of one prefill step of S tokens, at the end of the
  context (the step whose queries see all N keys); see `prefill_peak_bytes`.

`check_fits` turns a plan into a clear error when it does not fit a memory budget, with what
would fit instead.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .bench import random_checkpoint
from .loading import CheckpointError, read_config, weight_files
from .models import attention as attention_paths
from .models.cache import KVCache
from .models.config import FULL, LINEAR, ModelConfig, TextConfig

KV_BITS = (16, 8, 4)
DEFAULT_KV_GROUP_SIZE = 64
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
ACTIVATION_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MLX_DTYPES = {mx.float32: "F32", mx.bfloat16: "BF16", mx.float16: "F16", mx.uint32: "U32"}
GB = 1e9
# 4-bit conversion estimate (`qwen35-mlx convert -q`): 4-bit values, a bf16 scale and bias per
# group of 64 for every matrix whose input dimension splits into whole groups.
QUANT_BITS, QUANT_GROUP = 4, 64


class PlanError(ValueError):
    """Bad planner input: a context, KV bits or checkpoint it cannot plan for."""


class MemoryBudgetError(ValueError):
    """The plan does not fit the memory budget; the message says what would."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint as its safetensors header describes it."""

    name: str
    dtype: str  # safetensors dtype: "BF16", "U32", ...
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Checkpoint:
    """What the planner needs of a checkpoint: its config and its tensors (no data)."""

    name: str
    config: ModelConfig
    tensors: tuple[TensorInfo, ...]

    @property
    def activation_bytes(self) -> int:
        """Bytes per activation element: the embedding's dtype (its scales' when quantized),
        which the hidden states, keys, values and conv state take."""
        by_name = {t.name: t for t in self.tensors}
        for name in by_name:
            if name.endswith("embed_tokens.scales"):
                return DTYPE_BYTES[by_name[name].dtype]
        for name in by_name:
            if name.endswith("embed_tokens.weight"):
                return DTYPE_BYTES[by_name[name].dtype]
        raise PlanError(f"{self.name}: no embed_tokens tensor; not a Qwen3.5 checkpoint")

    @property
    def quantized(self) -> bool:
        return any(t.name.endswith(".scales") for t in self.tensors)


@dataclass(frozen=True)
class WeightBytes:
    text: int  # the text decoder: embedding, layers, final norm, lm_head
    vision: int  # the vision tower
    mtp: int  # the MTP head

    @property
    def total(self) -> int:
        return self.text + self.vision + self.mtp


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one model needs at a context length (batch 1); see the module docstring."""

    model: str
    context: int
    kv_bits: int
    kv_group_size: int
    prefill_step_size: int
    weights: WeightBytes
    kv_cache: int
    deltanet_state: int
    prefill_peak: int

    @property
    def total(self) -> int:
        return self.weights.total + self.kv_cache + self.deltanet_state + self.prefill_peak

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) per line of the table, the total last."""
        kv = "16-bit" if self.kv_bits == 16 else f"{self.kv_bits}-bit, group {self.kv_group_size}"
        return [
            ("weights: text decoder", self.weights.text),
            ("weights: vision tower", self.weights.vision),
            ("weights: MTP head", self.weights.mtp),
            (f"KV cache ({self.context} tokens, {kv})", self.kv_cache),
            ("DeltaNet state", self.deltanet_state),
            (f"prefill peak (step {self.prefill_step_size})", self.prefill_peak),
            ("total", self.total),
        ]


# --- reading a checkpoint ---------------------------------------------------------------------


def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(length))
    except (OSError, ValueError):
        raise CheckpointError(
            f"{file}: cannot read its safetensors header; the file is "
            "truncated or corrupt, download it again"
        ) from None


def header_tensors(directory: Path) -> tuple[TensorInfo, ...]:
    """Every tensor of the checkpoint's safetensors files, sized by its data offsets."""
    tensors = []
    for file in weight_files(directory):
        for name, entry in read_header(file).items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            tensors.append(TensorInfo(name, entry["dtype"], tuple(entry["shape"]), end - begin))
    return tuple(tensors)


def size_tensors(size: str) -> tuple[TensorInfo, ...]:
    """The tensors of a released checkpoint of `size` (bf16; A_log and the gated norm F32)."""
    return release_tensors(random_checkpoint.config_json(size))


def release_tensors(config: dict) -> tuple[TensorInfo, ...]:
    """The tensors a bf16 release with this Hugging Face config.json holds."""
    tensors = []
    for name, shape, kind in random_checkpoint.tensor_specs(config):
        # the release's on-disk dtype per tensor, as the random checkpoints write it
        disk = random_checkpoint._disk_dtype(name, kind, "bfloat16")
        dtype = "F32" if disk == "float32" else "BF16"
        tensors.append(TensorInfo(name, dtype, shape, math.prod(shape) * DTYPE_BYTES[dtype]))
    return tuple(tensors)


def open_checkpoint(model: str | Path | ModelConfig) -> Checkpoint:
    """A checkpoint directory or a size name ("0.8B", "2B", "4B", "9B") -> Checkpoint.

    Raises:
        PlanError / CheckpointError naming what is missing.
    """
    if isinstance(model, Checkpoint):
        return model
    if isinstance(model, ModelConfig):
        return config_checkpoint(model)
    if hasattr(model, "parameters") and hasattr(model, "config"):
        return loaded_checkpoint(model)
    name = str(model)
    if name in random_checkpoint.SIZES:
        config = ModelConfig.from_hf(random_checkpoint.config_json(name))
        return Checkpoint(name, config, size_tensors(name))
    directory = Path(model).expanduser()
    if not directory.is_dir():
        raise PlanError(
            f"{name}: not a checkpoint directory and not a size name (one of "
            f"{', '.join(random_checkpoint.SIZES)}); download the checkpoint "
            "first or give a size"
        )
    return Checkpoint(str(directory), read_config(directory), header_tensors(directory))


def config_checkpoint(config: ModelConfig) -> Checkpoint:
    """A Hugging Face layout config alone: the tensors its release holds (bf16, as
    `size_tensors`); a converted (quantized) config needs its directory instead."""
    raw = config.raw
    if "text_config" not in raw or raw.get("quantization") or raw.get("quantization_config"):
        raise PlanError(
            "a converted or text-only config does not say its tensors' sizes; "
            "pass the checkpoint directory (or the loaded model) instead"
        )
    name = raw.get("_name_or_path", config.model_type)
    return Checkpoint(name, config, release_tensors(raw))


def loaded_checkpoint(model) -> Checkpoint:
    """A loaded `Model`: its parameters (the MTP head's included) as they are in memory."""
    tensors = tuple(
        TensorInfo(name, MLX_DTYPES.get(array.dtype, "F32"), tuple(array.shape), array.nbytes)
        for name, array in tree_flatten(model.parameters())
    )
    return Checkpoint("the loaded model", model.config, tensors)


def part_of(name: str) -> str:
    """ "vision", "mtp" or "text": which part of the model a tensor belongs to."""
    if name.startswith(("vision_tower.", "model.visual.", "visual.")):
        return "vision"
    if name.startswith(("mtp.", "model.mtp.")):
        return "mtp"
    return "text"


def weight_bytes(tensors: tuple[TensorInfo, ...]) -> WeightBytes:
    parts = {"text": 0, "vision": 0, "mtp": 0}
    for tensor in tensors:
        parts[part_of(tensor.name)] += tensor.nbytes
    return WeightBytes(**parts)


def quantized_weight_bytes(tensors: tuple[TensorInfo, ...]) -> WeightBytes:
    """About what a 4-bit conversion holds: every 2-D text/MTP matrix whose input dimension
    splits into groups of 64 at 4 bits plus a bf16 scale and bias per group; the vision tower,
    norms and vectors as they are. (The default recipe keeps a few small matrices at 8 bits or
    float; those are a rounding error here.)"""
    parts = {"text": 0, "vision": 0, "mtp": 0}
    for tensor in tensors:
        part = part_of(tensor.name)
        quantizable = (
            part != "vision"
            and len(tensor.shape) == 2
            and tensor.shape[-1] % QUANT_GROUP == 0
            and tensor.dtype != "U32"
        )
        if quantizable:
            elements = math.prod(tensor.shape)
            parts[part] += elements * QUANT_BITS // 8 + 2 * 2 * elements // QUANT_GROUP
        else:
            parts[part] += tensor.nbytes
    return WeightBytes(**parts)


# --- the formulas -----------------------------------------------------------------------------


def kv_element_bytes(kv_bits: int, group_size: int, activation_bytes: int) -> float:
    """Bytes per key or value element: the activation dtype at 16 bits; else the packed bits
    plus a scale and a bias (activation dtype) per group."""
    if kv_bits == 16:
        return activation_bytes
    return kv_bits / 8 + 2 * activation_bytes / group_size


def kv_capacity(context: int) -> int:
    """Tokens the KV buffers hold for `context` tokens: whole blocks of `KVCache.step`."""
    return -(-context // KVCache.step) * KVCache.step


def kv_cache_bytes(
    text: TextConfig,
    context: int,
    kv_bits: int = 16,
    group_size: int = DEFAULT_KV_GROUP_SIZE,
    activation_bytes: int = 2,
) -> int:
    """2 · layers_full · Hkv · head_dim · capacity · bytes per element.

    Args:
        text: the text decoder's config.
        context: tokens in the cache.
        kv_bits: 16 (the activation dtype), 8 or 4.
        group_size: elements per scale and bias when quantized.
        activation_bytes: bytes of the activation dtype (2 for bf16).

    Returns:
        The bytes of every full-attention layer's keys and values.
    """
    full_layers = text.layer_types.count(FULL)
    elements = 2 * full_layers * text.num_key_value_heads * text.head_dim * kv_capacity(context)
    return math.ceil(elements * kv_element_bytes(kv_bits, group_size, activation_bytes))


def deltanet_state_bytes(text: TextConfig, activation_bytes: int = 2) -> int:
    """Per DeltaNet layer: conv state (K-1) · conv_dim in the activation dtype plus recurrent
    state Hv · Dv · Dk in float32. Constant in the context length."""
    conv = (text.linear_conv_kernel_dim - 1) * text.conv_dim * activation_bytes
    recurrent = (
        text.linear_num_value_heads * text.linear_value_head_dim * text.linear_key_head_dim * 4
    )
    return text.layer_types.count(LINEAR) * (conv + recurrent)


def prefill_peak_bytes(
    text: TextConfig, step: int, context: int, activation_bytes: int = 2, device: str | None = None
) -> int:
    """The transient bytes of one prefill step of `step` tokens whose queries see `context`
    keys (batch 1, a = activation bytes), from models/text.py and gated_delta/.

    MLX evaluates the step's graph lazily, frees each array after its last reader and lets
    an elementwise op write into an input it holds the last reference to, so layers mostly do
    not stack up: the peak is the largest layer's working set on top of the residual stream,
    plus what each DeltaNet layer leaves alive until the step ends. Assumed (coefficients
    counted from the code and checked on 0.8B-width layers on the CPU back end, see
    tests/test_plan.py):

    - residual stream: the embedding, the hidden state and its normed copy, 3 · S · H · a;
    - full attention: below `attention.BLOCKED_MIN_SCORES` scores per head, MLX's composed
      attention (the CPU back end always; Metal for shapes its fused kernels lack)
      materialises the scores [Hq, S, N] once (the mask and softmax reuse the buffer),
      Hq · S · N · a, plus the causal mask S · N bytes; above it the key-blocked path holds
      a block of float32 scores, their exponentials and weights, 3 · Hq · min(S, QUERY_BLOCK)
      · BLOCK_SIZE · 4, and the float32 accumulator and output, 2 · Hq · S · hd · 4; plus the
      projections q|gate, k, v and the output, (2·Hq·hd + 2·Hkv·hd + Hq·hd) · S · a;
    - a DeltaNet layer: the projections in_proj_qkv, its padded copy and the conv output
      (3 · conv_dim) and z (value_dim), times S · a; the plain-MLX chunked scan's float32
      arrays of [S, Hv, D] alive at once: q, k, v after the cast and norm, their chunked
      copies, chunk_terms' k·beta, q·decay, v·beta, w, u, reads (2x), k_to_end, the
      per-chunk outputs and their stack: 14 · S · Hv · D · 4;
    - the MLP: gate, up and their product, 3 · S · intermediate · a;
    - on the CPU back end with 16-bit activations, a matmul runs in float32 on converted
      copies: the largest weight matrix W [rows, H] plus its input and output, (rows · H +
      S · (H + rows)) · 4;
    - the last token's logits and log-probabilities in float32, 2 · vocab · 4 (the prefill
      loop computes no other logits);
    - on the CPU back end, per DeltaNet layer, 3 · S · Hv · Dv · 4 bytes that outlive the
      layer until the step's evaluation ends: measured, not derived (a 0.8B-width step of
      1024 tokens peaks 17 MB higher per added layer: 330 / 398 / 674 MB above the weights
      at 4 / 8 / 24 layers; the per-chunk reads of the chunked scan, held for outputs the
      next layer evaluates, are the likely holders).

    Args:
        text: the text decoder's config.
        step: prompt tokens per forward pass (prefill_step_size).
        context: keys the step's queries see (the context length at the last step).
        activation_bytes: bytes of the activation dtype.
        device: "cpu" or "gpu"; default the current default device.

    Returns:
        The estimated peak transient bytes (on top of weights and caches).
    """
    S, N, a = min(step, context), context, activation_bytes
    H, Hq, Hkv, hd = (
        text.hidden_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.head_dim,
    )
    Hv = text.linear_num_value_heads
    D = max(text.linear_key_head_dim, text.linear_value_head_dim)
    device = device or ("cpu" if mx.default_device() == mx.cpu else "gpu")
    residual = 3 * S * H * a
    if S * N > attention_paths.BLOCKED_MIN_SCORES:  # the path attention.pick_path takes
        scores = (
            3 * Hq * min(S, attention_paths.QUERY_BLOCK) * attention_paths.BLOCK_SIZE * 4
            + 2 * Hq * S * hd * 4
        )
    else:
        scores = Hq * S * N * a + S * N
    attention = scores + (2 * Hq * hd + 2 * Hkv * hd + Hq * hd) * S * a
    deltanet = (3 * text.conv_dim + text.value_dim) * S * a + 14 * S * Hv * D * 4
    mlp = 3 * S * text.intermediate_size * a
    rows = max(text.conv_dim, text.intermediate_size, 2 * Hq * hd)
    float32_matmul = (rows * H + S * (H + rows)) * 4 if device == "cpu" and a < 4 else 0
    logits = 2 * text.vocab_size * 4
    retained = text.layer_types.count(LINEAR) * 3 * S * Hv * D * 4 if device == "cpu" else 0
    return residual + max(attention, deltanet, mlp) + float32_matmul + logits + retained


# --- the plan ---------------------------------------------------------------------------------


def check_inputs(context: int, kv_bits: int, group_size: int, prefill_step_size: int) -> None:
    for name, value in (
        ("context", context),
        ("prefill_step_size", prefill_step_size),
        ("kv_group_size", group_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PlanError(f"{name} must be a whole number > 0, got {value!r}")
    if kv_bits not in KV_BITS:
        raise PlanError(f"kv_bits must be one of {KV_BITS} (16: unquantized), got {kv_bits!r}")


def plan_memory(
    model: str | Path | Checkpoint,
    context: int,
    kv_bits: int = 16,
    prefill_step_size: int = 2048,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
) -> MemoryPlan:
    """What `model` needs at `context` tokens, batch 1.

    Args:
        model: a checkpoint directory, a size name ("0.8B", "2B", "4B", "9B") or a Checkpoint.
        context: tokens in the cache (prompt plus reply), > 0.
        kv_bits: 16, 8 or 4 bits per key/value element.
        prefill_step_size: prompt tokens per forward pass.
        kv_group_size: elements per scale and bias of a quantized KV cache.

    Returns:
        A MemoryPlan; `.total` is the sum, `.rows()` the table.

    Raises:
        PlanError for bad input, CheckpointError for a missing or broken checkpoint.
    """
    check_inputs(context, kv_bits, kv_group_size, prefill_step_size)
    checkpoint = open_checkpoint(model)
    text, a = checkpoint.config.text, checkpoint.activation_bytes
    return MemoryPlan(
        model=checkpoint.name,
        context=context,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        prefill_step_size=prefill_step_size,
        weights=weight_bytes(checkpoint.tensors),
        kv_cache=kv_cache_bytes(text, context, kv_bits, kv_group_size, a),
        deltanet_state=deltanet_state_bytes(text, a),
        prefill_peak=prefill_peak_bytes(text, prefill_step_size, context, a),
    )


def machine_memory() -> tuple[int, str]:
    """(bytes, what they are): Metal's recommended working set when Metal is available, else
    the machine's physical RAM."""
    if mx.metal.is_available():
        info = mx.metal.device_info()
        recommended = info.get("max_recommended_working_set_size")
        if recommended:
            return int(recommended), "Metal recommended working set"
        return int(info["memory_size"]), "unified memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"


def largest_context(fits, limit: int) -> int:
    """The largest context in [1, limit] for which `fits(context)` holds (monotone: more
    context never needs less memory); 0 when none does."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def check_fits(
    model_config_or_dir,
    context: int,
    kv_bits: int = 16,
    prefill_step_size: int = 2048,
    budget_bytes: int | None = None,
) -> MemoryPlan:
    """The plan, or MemoryBudgetError when it needs more than `budget_bytes`.

    Args:
        model_config_or_dir: a checkpoint directory, a size name or a Checkpoint.
        context: tokens the cache will hold (prompt plus reply).
        kv_bits: 16, 8 or 4.
        prefill_step_size: prompt tokens per forward pass.
        budget_bytes: memory available; default `machine_memory()`.

    Returns:
        The MemoryPlan when it fits.

    Raises:
        MemoryBudgetError: naming what is needed, what there is, and what would fit: the
        largest context at 16-bit and at 4-bit KV, a 4-bit conversion of the weights, a
        smaller prefill step.
    """
    checkpoint = open_checkpoint(model_config_or_dir)
    plan = plan_memory(checkpoint, context, kv_bits, prefill_step_size)
    budget = machine_memory()[0] if budget_bytes is None else budget_bytes
    if plan.total <= budget:
        return plan
    raise MemoryBudgetError(
        f"{checkpoint.name} at {context} tokens ({kv_bits}-bit KV, prefill step "
        f"{prefill_step_size}) needs {plan.total / GB:.2f} GB, this machine has "
        f"{budget / GB:.2f} GB; would fit: " + "; ".join(alternatives(checkpoint, plan, budget))
    )


def alternatives(checkpoint: Checkpoint, plan: MemoryPlan, budget: int) -> list[str]:
    """What would fit in `budget` instead of `plan`, one phrase each."""
    limit = max(plan.context, checkpoint.config.text.max_position_embeddings)

    def fits(kv_bits: int, step: int = plan.prefill_step_size):
        return lambda n: plan_memory(checkpoint, n, kv_bits, step).total <= budget

    options = []
    for bits, how in ((16, "at 16-bit KV"), (4, "with --kv-bits 4")):
        best = largest_context(fits(bits), limit)
        options.append(f"context ≤ {best} {how}" if best else f"no context {how}")
    if not checkpoint.quantized:
        weights = quantized_weight_bytes(checkpoint.tensors).total
        smaller = plan.total - plan.weights.total + weights
        verdict = "fits" if smaller <= budget else "still too big"
        options.append(
            f"a 4-bit conversion of the weights (qwen35-mlx convert -q: about "
            f"{weights / GB:.2f} GB of weights, {smaller / GB:.2f} GB in all, "
            f"{verdict})"
        )
    step = plan.prefill_step_size // 2
    while step >= 64 and not fits(plan.kv_bits, step)(plan.context):
        step //= 2
    if step >= 64:
        options.append(f"--prefill-step-size {step}")
    else:
        options.append("no smaller --prefill-step-size alone")
    return options


def format_plan(plan: MemoryPlan, memory: tuple[int, str] | None = None) -> str:
    """The plan as an aligned table in GB (and GiB), the machine's memory below it."""
    rows = plan.rows()
    width = max(len(label) for label, _ in rows)
    lines = [f"{plan.model}: memory at {plan.context} tokens, batch 1"]
    for label, nbytes in rows:
        if label == "total":
            lines.append("-" * (width + 28))
        lines.append(f"{label:<{width}}  {nbytes / GB:10.3f} GB  {nbytes / 2**30:9.3f} GiB")
    if memory is not None:
        nbytes, what = memory
        verdict = "fits" if plan.total <= nbytes else "does NOT fit"
        lines.append(
            f"{'this machine (' + what + ')':<{width}}  {nbytes / GB:10.3f} GB  "
            f"{nbytes / 2**30:9.3f} GiB  ({verdict})"
        )
    return "\n".join(lines)
