"""Random-weight Qwen3.5 checkpoints in the released Hugging Face layout, for benchmarks.

`write_random_checkpoint` writes what a `Qwen3_5ForConditionalGeneration` release holds for the
text path (docs/ARCHITECTURE.md §1.2, §2.1): config.json with the real field values of a size,
`model.language_model.*` tensors (A_log and the gated norm in float32 as the release stores
them, the rest in the checkpoint dtype), the vision tower of §4 unless `vision=False`, the MTP
head of §6 unless `mtp=False` (with both, the parameter count is the release's, §1.4), the
released preprocessor_config.json and video_preprocessor_config.json with the tower, and the
tokenizer files of `tokenizer_files.py` (the released special-token ids, a byte-level vocabulary
dense up to them, the size's released chat template), so that `qwen35_mlx.load`, `mlx_lm.load`
and transformers (which ignore `mtp.*`) all accept the folder and can chat with it.

Only numpy and safetensors are used (no torch): `safetensors.numpy.save_file` cannot name
bfloat16 without the ml_dtypes package, so the tensors go through the serializer it wraps,
`safetensors.serialize_file`, with bfloat16 given as bit patterns in uint16.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, serialize_file

from ..processor import PROCESSOR_FILES
from .tokenizer_files import write_tokenizer_files

LINEAR, FULL = "linear_attention", "full_attention"
ROPE = {
    "rope_type": "default",
    "rope_theta": 10_000_000,
    "partial_rotary_factor": 0.25,
    "mrope_section": [11, 11, 10],
    "mrope_interleaved": True,
}
TEXT_COMMON = dict(
    model_type="qwen3_5_text",
    vocab_size=248320,
    head_dim=256,
    linear_num_key_heads=16,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    full_attention_interval=4,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=262144,
    attention_bias=False,
    attention_dropout=0.0,
    attn_output_gate=True,
    bos_token_id=248044,
    eos_token_id=248044,
    initializer_range=0.02,
    mamba_ssm_dtype="float32",
    mtp_num_hidden_layers=1,
    mtp_use_dedicated_embeddings=False,
    use_cache=True,
    rope_parameters=ROPE,
)
SIZES = {  # docs/ARCHITECTURE.md §1.2
    "0.8B": dict(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        linear_num_value_heads=16,
        tie_word_embeddings=True,
    ),
    "2B": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        linear_num_value_heads=16,
        tie_word_embeddings=True,
    ),
    "4B": dict(
        hidden_size=2560,
        intermediate_size=9216,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        linear_num_value_heads=32,
        tie_word_embeddings=True,
    ),
    "9B": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        linear_num_value_heads=32,
        tie_word_embeddings=False,
    ),
}
# The sizes whose released chat template thinks by default (the others answer directly).
THINKING_SIZES = ("4B", "9B")
VISION_COMMON = dict(
    model_type="qwen3_5",
    hidden_act="gelu_pytorch_tanh",
    in_channels=3,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[],
    initializer_range=0.02,
)
VISION_SIZES = {  # docs/ARCHITECTURE.md §1.3
    "0.8B": dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12),
    "2B": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16),
    "4B": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16),
    "9B": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16),
}
TOKEN_IDS = dict(
    image_token_id=248056,
    video_token_id=248057,
    vision_start_token_id=248053,
    vision_end_token_id=248054,
)
DTYPES = ("bfloat16", "float32")
SHARD_BYTES = 2_000_000_000

# How each tensor is drawn. HF stores w of the (1+w) norms; the gated norm is plain w (init 1).
MATRIX, SHIFTED_NORM, PLAIN_NORM, A_LOG, DT_BIAS, BIAS = (
    "matrix",
    "shifted_norm",
    "plain_norm",
    "A_log",
    "dt_bias",
    "bias",
)


def config_json(
    size: str = "0.8B",
    num_layers: int | None = None,
    dtype: str = "bfloat16",
    overrides: dict | None = None,
    vision: bool = True,
    mtp: bool = True,
) -> dict:
    """The config.json of a random checkpoint: the real fields of `size`, then `overrides`
    (top-level keys; "text_config"/"vision_config" dicts are merged into those sections).
    Without `mtp`, text_config says `mtp_num_hidden_layers: 0` (the release says 1)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    overrides = dict(overrides or {})
    text = {**TEXT_COMMON, **SIZES[size], **overrides.pop("text_config", {}), "dtype": dtype}
    if num_layers is not None:
        text["num_hidden_layers"] = num_layers
    if not mtp:
        text["mtp_num_hidden_layers"] = 0
    layers = text["num_hidden_layers"]
    if layers < 4 or layers % 4:
        raise ValueError(
            f"num_layers must be a positive multiple of 4 (the layer pattern is "
            f"3 linear + 1 full attention), got {layers}"
        )
    text["layer_types"] = [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(layers)]
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "tie_word_embeddings": text["tie_word_embeddings"],
        **TOKEN_IDS,
        "text_config": text,
        "transformers_version": "4.57.0.dev0",
    }
    vision_overrides = overrides.pop("vision_config", {})
    if vision:
        config["vision_config"] = {
            **VISION_COMMON,
            **VISION_SIZES[size],
            "out_hidden_size": text["hidden_size"],
            **vision_overrides,
        }
    config.update(overrides)
    return config


def tensor_specs(config: dict) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor the checkpoint holds (docs/ARCHITECTURE.md §2.1,
    §4, §6)."""
    t = config["text_config"]
    H, I, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    Hv = t["linear_num_value_heads"]
    key_dim = t["linear_num_key_heads"] * t["linear_key_head_dim"]
    value_dim = Hv * t["linear_value_head_dim"]
    conv_dim = 2 * key_dim + value_dim
    p = "model.language_model."
    yield p + "embed_tokens.weight", (V, H), MATRIX
    for i, layer_type in enumerate(t["layer_types"]):
        layer = f"{p}layers.{i}."
        yield layer + "input_layernorm.weight", (H,), SHIFTED_NORM
        yield layer + "post_attention_layernorm.weight", (H,), SHIFTED_NORM
        yield layer + "mlp.gate_proj.weight", (I, H), MATRIX
        yield layer + "mlp.up_proj.weight", (I, H), MATRIX
        yield layer + "mlp.down_proj.weight", (H, I), MATRIX
        if layer_type == LINEAR:
            mixer = layer + "linear_attn."
            yield mixer + "in_proj_qkv.weight", (conv_dim, H), MATRIX
            yield mixer + "in_proj_z.weight", (value_dim, H), MATRIX
            yield mixer + "in_proj_b.weight", (Hv, H), MATRIX
            yield mixer + "in_proj_a.weight", (Hv, H), MATRIX
            yield mixer + "conv1d.weight", (conv_dim, 1, t["linear_conv_kernel_dim"]), MATRIX
            yield mixer + "A_log", (Hv,), A_LOG
            yield mixer + "dt_bias", (Hv,), DT_BIAS
            yield mixer + "norm.weight", (t["linear_value_head_dim"],), PLAIN_NORM
            yield mixer + "out_proj.weight", (H, value_dim), MATRIX
        else:
            yield from _attention_specs(layer + "self_attn.", t)
    yield p + "norm.weight", (H,), SHIFTED_NORM
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", (V, H), MATRIX
    if "vision_config" in config:
        yield from _vision_specs(config["vision_config"])
    yield from _mtp_specs(t)


def _attention_specs(attn: str, t: dict) -> Iterator[tuple[str, tuple[int, ...], str]]:
    H, hd, nh, nkv = (
        t["hidden_size"],
        t["head_dim"],
        t["num_attention_heads"],
        t["num_key_value_heads"],
    )
    yield attn + "q_proj.weight", (2 * nh * hd, H), MATRIX  # query and gate, per head
    yield attn + "k_proj.weight", (nkv * hd, H), MATRIX
    yield attn + "v_proj.weight", (nkv * hd, H), MATRIX
    yield attn + "o_proj.weight", (H, nh * hd), MATRIX
    yield attn + "q_norm.weight", (hd,), SHIFTED_NORM
    yield attn + "k_norm.weight", (hd,), SHIFTED_NORM


def _mtp_specs(t: dict) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """The MTP head (docs/ARCHITECTURE.md §6): fc over [embedding ‖ hidden], full-attention decoder
    layers, (1+w) norms; it shares the embedding and lm_head, so it has none of its own."""
    H, I = t["hidden_size"], t["intermediate_size"]
    layers = t.get("mtp_num_hidden_layers", 0)
    if not layers:
        return
    yield "mtp.fc.weight", (H, 2 * H), MATRIX
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        yield f"mtp.{norm}.weight", (H,), SHIFTED_NORM
    for i in range(layers):
        layer = f"mtp.layers.{i}."
        yield layer + "input_layernorm.weight", (H,), SHIFTED_NORM
        yield layer + "post_attention_layernorm.weight", (H,), SHIFTED_NORM
        yield from _attention_specs(layer + "self_attn.", t)
        yield layer + "mlp.gate_proj.weight", (I, H), MATRIX
        yield layer + "mlp.up_proj.weight", (I, H), MATRIX
        yield layer + "mlp.down_proj.weight", (H, I), MATRIX


def _vision_specs(v: dict) -> Iterator[tuple[str, tuple[int, ...], str]]:
    C, Iv, merged = v["hidden_size"], v["intermediate_size"], 4 * v["hidden_size"]
    p = "model.visual."
    yield (
        p + "patch_embed.proj.weight",
        (C, v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"]),
        MATRIX,
    )
    yield p + "patch_embed.proj.bias", (C,), BIAS
    yield p + "pos_embed.weight", (v["num_position_embeddings"], C), MATRIX
    for j in range(v["depth"]):
        block = f"{p}blocks.{j}."
        for norm in ("norm1", "norm2"):
            yield block + norm + ".weight", (C,), PLAIN_NORM
            yield block + norm + ".bias", (C,), BIAS
        for name, (rows, cols) in {
            "attn.qkv": (3 * C, C),
            "attn.proj": (C, C),
            "mlp.linear_fc1": (Iv, C),
            "mlp.linear_fc2": (C, Iv),
        }.items():
            yield block + name + ".weight", (rows, cols), MATRIX
            yield block + name + ".bias", (rows,), BIAS
    yield p + "merger.norm.weight", (C,), PLAIN_NORM
    yield p + "merger.norm.bias", (C,), BIAS
    for name, (rows, cols) in {
        "linear_fc1": (merged, merged),
        "linear_fc2": (v["out_hidden_size"], merged),
    }.items():
        yield p + f"merger.{name}.weight", (rows, cols), MATRIX
        yield p + f"merger.{name}.bias", (rows,), BIAS


def _draw(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == A_LOG:
        return np.log(rng.uniform(1.0, 16.0, size=shape)).astype(np.float32)
    # In place: a copy of each large matrix costs as much time as drawing it.
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(0.02 if kind in (MATRIX, BIAS) else 0.1)
    if kind != MATRIX and kind != BIAS and kind != SHIFTED_NORM:
        noise += np.float32(1.0)  # PLAIN_NORM, DT_BIAS: around 1
    return noise


def _disk_dtype(name: str, kind: str, dtype: str) -> str:
    # The release stores A_log and the DeltaNet gated norm in F32 (docs/ARCHITECTURE.md §1.4).
    return "float32" if kind == A_LOG or name.endswith("linear_attn.norm.weight") else dtype


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (no NaNs here)."""
    bits = x.view(np.uint32)
    carry = bits >> np.uint32(16)  # one temporary, updated in place (the arrays are large)
    carry &= np.uint32(1)
    carry += np.uint32(0x7FFF)
    bits += carry
    bits >>= np.uint32(16)
    return bits.astype(np.uint16)


def _save(tensors: dict[str, tuple[str, np.ndarray]], file: Path) -> None:
    specs = {
        name: TensorSpec(
            dtype=dtype, shape=array.shape, data_ptr=array.ctypes.data, data_len=array.nbytes
        )
        for name, (dtype, array) in tensors.items()
    }
    serialize_file(specs, str(file), metadata={"format": "pt"})


def _write_weights(config: dict, directory: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dtype = config["text_config"]["dtype"]
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec in tensor_specs(config):  # assign tensors to ~2 GB shards in order
        name, shape, kind = spec
        nbytes = math.prod(shape) * (4 if _disk_dtype(name, kind, dtype) == "float32" else 2)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        file = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {}
        for name, shape, kind in shard:
            disk = _disk_dtype(name, kind, dtype)
            value = _draw(rng, shape, kind)
            tensors[name] = (disk, _bfloat16_bits(value) if disk == "bfloat16" else value)
            weight_map[name] = file
            total += tensors[name][1].nbytes
        _save(tensors, directory / file)
        del tensors
    if len(shards) > 1:
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def write_random_checkpoint(
    directory: str | Path,
    size: str = "0.8B",
    num_layers: int | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    overrides: dict | None = None,
    vision: bool = True,
    mtp: bool = True,
) -> Path:
    """Write a random-weight checkpoint of a Qwen3.5 size in the released layout.

    Args:
        directory: where to write; must not exist or be empty. Files are written into a
            temporary sibling folder that is renamed into place when complete.
        size: "0.8B", "2B", "4B" or "9B" (docs/ARCHITECTURE.md §1.2 shapes).
        num_layers: fewer (or more) decoder layers, a multiple of 4, for quick runs.
        dtype: "bfloat16" (as released) or "float32" for the matrices and (1+w) norms.
        seed: numpy seed; the same arguments give the same bytes.
        overrides: config.json overrides, e.g. {"text_config": {"hidden_size": 64, ...}}
            for tiny test models.
        vision: also write the vision tower and its vision_config (the text bench ignores it).
        mtp: also write the MTP head (`mtp.*`, docs/ARCHITECTURE.md §6), as every release has.

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(
            f"{directory} exists and is not an empty folder; choose a new "
            "--out folder or delete it first"
        )
    config = config_json(size, num_layers, dtype, overrides, vision, mtp)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_weights(config, partial, seed)
        write_tokenizer_files(partial, thinking_by_default=size in THINKING_SIZES)
        if vision:
            for name, content in PROCESSOR_FILES.items():
                (partial / name).write_text(json.dumps(content, indent=2) + "\n")
        for file in partial.iterdir():  # mkdtemp and the serializer create owner-only modes
            file.chmod(0o644)
        partial.chmod(0o755)
        if directory.exists():
            directory.rmdir()
        partial.rename(directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory
