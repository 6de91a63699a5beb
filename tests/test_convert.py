"""Conversion: round trips against transformers, the hybrid and uniform recipes, what the
output folder carries, vision tower and MTP head, dequantization, writing that leaves nothing
behind on error, interruption or a full disk, verification output, upload and the CLI."""

import ast
import collections
import errno
import importlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest.mock import create_autospec

import huggingface_hub
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from mlx.utils import tree_flatten

from qwen35_mlx.cli import main
from qwen35_mlx.convert import ConvertError, convert, writer
from qwen35_mlx.convert.dequantize import dequantize_modules
from qwen35_mlx.convert.verify import PROMPT
from qwen35_mlx.convert.writer import HEADROOM, WriteError
from qwen35_mlx.loading import CheckpointError, is_converted, load_model
from qwen35_mlx.tokenizer import Tokenizer

from checkpoints import Spec, build_reference
from helpers import (
    add_mtp_head,
    contents,
    copy_checkpoint,
    mtp_shapes,
    mtp_tensors,
    prompt,
    reference_logits,
    rewrite_weights,
)
from metrics import relative_error
from tokenizer_files import write_tokenizer_files

# the module, which the package's `convert` function shadows as an attribute
convert_module = importlib.import_module("qwen35_mlx.convert.convert")
CONDITIONAL = Spec(layout="conditional", hv_per_hk=2)  # with a vision tower; Hv = 2·Hk
CAUSAL = Spec()
SHARDED = Spec(max_shard_size="100KB")
# The vision tower is 32 wide and the decoder 64: groups of 32 quantize every matrix (the
# predicate keeps float any matrix whose input dim does not split into whole groups).
GROUP = 32
LINEAR_LAYERS = (0, 1, 2)  # layer 3 is full attention (full_attention_interval 4)


def logits(directory: Path, ids) -> np.ndarray:
    return np.array(load_model(directory)(mx.array(ids)).astype(mx.float32))


def tensors(directory: Path) -> dict[str, mx.array]:
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        found.update(mx.load(str(file)))
    return found


def bits_on_disk(weights: dict[str, mx.array], base: str) -> int | None:
    """Bits of an affine-quantized matrix from its packed shape; None when it is float."""
    if f"{base}.scales" not in weights:
        return None
    packed, scales = (
        weights[f"{base}.weight"],
        weights[f"{base}.scales"],
    )  # [O, I·bits/32], [O, I/g]
    return packed.shape[-1] * 32 // (scales.shape[-1] * GROUP)


def tree(root: Path) -> tuple[dict[str, str], list[str]]:
    """(file hashes, every path) under `root`, hidden staging folders and empty ones included."""
    return contents(root), sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def matrices(directory: Path) -> list[str]:
    """Paths of the text model's Linear and Embedding modules, read from a float checkpoint."""
    return [
        "language_model." + path
        for path, module in load_model(directory).language_model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding))
    ]


@pytest.fixture(scope="module")
def converted(make_checkpoint, tmp_path_factory):
    """converted(spec or source folder, **convert kwargs) -> output folder, converted once."""
    done = {}

    def convert_once(source=CONDITIONAL, **kwargs):
        if isinstance(source, Spec):
            source, _ = make_checkpoint(source)
        key = (str(source), tuple(sorted(kwargs.items())))
        if key not in done:
            target = tmp_path_factory.mktemp("converted") / "mlx"
            done[key] = convert(str(source), str(target), verify_output=False, **kwargs)
        return done[key]

    return convert_once


def quantized(bits, recipe="hybrid", dtype="float32", **kwargs) -> dict:
    return dict(
        quantize=True, q_bits=bits, q_group_size=GROUP, recipe=recipe, dtype=dtype, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# 1. Round trips on tiny random checkpoints, against transformers.


@pytest.mark.parametrize("spec", [CONDITIONAL, CAUSAL], ids=["conditional", "causal"])
def test_float_round_trip_matches_transformers(make_checkpoint, converted, spec):
    source, reference = make_checkpoint(spec)
    target = converted(spec, dtype="float32")
    assert is_converted(target)
    ids = prompt()
    assert relative_error(logits(target, ids), reference_logits(reference, ids)) <= 1e-5
    # the stored weights are the run-time ones: loading transforms nothing a second time
    ours, theirs = load_model(source), load_model(target)
    expected = dict(tree_flatten(ours.parameters()))
    stored = dict(tree_flatten(theirs.parameters()))
    assert stored.keys() == expected.keys()
    for name, value in expected.items():
        assert mx.array_equal(stored[name], value).item(), name


@pytest.mark.parametrize("spec", [CONDITIONAL, CAUSAL], ids=["conditional", "causal"])
def test_quantized_error_falls_as_bits_rise(make_checkpoint, converted, spec):
    _, reference = make_checkpoint(spec)
    ids = prompt()
    expected = reference_logits(reference, ids)
    errors = {}
    for bits in (8, 6, 4):
        target = converted(spec, **quantized(bits))
        model = load_model(target)
        assert isinstance(model.layers[0].mlp.up_proj, nn.QuantizedLinear)
        assert model.layers[0].mlp.up_proj.bits == bits
        errors[bits] = relative_error(np.array(model(mx.array(ids))), expected)
    assert 0 < errors[8] < errors[6] < errors[4] < 0.25, errors


@pytest.fixture(scope="module")
def deltanet_heavy(tmp_path_factory):
    """CONDITIONAL with its DeltaNet projections scaled by 5. In the plain tiny model the ×20
    embeddings carry the logits, so the recipes' difference, all of it in the DeltaNet layers,
    drowns in the embedding's and lm_head's quantization error (4 bits: 0.1134786 hybrid vs
    0.1134762 uniform, the same to 1e-5). Here the DeltaNet layers carry the signal."""
    model = build_reference(CONDITIONAL)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "linear_attn" in name and "proj" in name:
                param.mul_(5.0)
    directory = tmp_path_factory.mktemp("deltanet-heavy")
    model.save_pretrained(directory)
    write_tokenizer_files(directory, thinking_by_default=False)
    return directory, model


def test_hybrid_recipe_no_worse_than_uniform_at_4_bits(converted, deltanet_heavy):
    source, reference = deltanet_heavy
    ids = prompt()
    expected = reference_logits(reference, ids)
    errors = {
        recipe: relative_error(logits(converted(source, **quantized(4, recipe)), ids), expected)
        for recipe in ("hybrid", "uniform")
    }
    assert errors["hybrid"] < errors["uniform"] < 0.5, errors


# ---------------------------------------------------------------------------------------------
# 2. What the recipes quantize.


@pytest.mark.parametrize("recipe", ["hybrid", "uniform"])
def test_recipe_decides_each_matrix(converted, recipe):
    weights = tensors(converted(CONDITIONAL, **quantized(4, recipe, dtype="bfloat16")))
    names = matrices(converted(CONDITIONAL, dtype="float32"))
    assert any(n.endswith("embed_tokens") for n in names) and any("lm_head" in n for n in names)
    for path in names:
        if recipe == "hybrid" and path.endswith(("in_proj_a", "in_proj_b")):
            expected = None  # [Hv, H] gate projections: tiny and rate-setting, kept float
        elif recipe == "hybrid" and path.endswith("linear_attn.out_proj"):
            expected = 8
        else:
            expected = 4
        assert bits_on_disk(weights, path) == expected, path
        if expected is None:
            assert weights[f"{path}.weight"].dtype == mx.bfloat16, path


@pytest.mark.parametrize("recipe", ["hybrid", "uniform"])
def test_norms_a_log_and_conv_never_quantized(converted, recipe):
    weights = tensors(converted(CONDITIONAL, **quantized(4, recipe, dtype="bfloat16")))
    kept = [n for n in weights if n.endswith(("norm.weight", "A_log", "conv1d.weight", "dt_bias"))]
    for kind in (
        "input_layernorm.weight",
        "linear_attn.norm.weight",
        "q_norm.weight",
        "model.norm.weight",
        "conv1d.weight",
        "A_log",
        "dt_bias",
    ):
        assert any(n.endswith(kind) for n in kept), kind
    for name in kept:
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        assert f"{base}.scales" not in weights, name
        # Model.cast_predicate: the vision tower's LayerNorms follow the dtype
        float32 = name.endswith(("norm.weight", "A_log")) and not name.startswith("vision_tower.")
        assert weights[name].dtype == (mx.float32 if float32 else mx.bfloat16), name


# ---------------------------------------------------------------------------------------------
# 3. What the output folder carries.


@pytest.mark.parametrize(
    "recipe, bits",
    [("hybrid", 4), ("hybrid", 6), ("hybrid", 8), ("uniform", 4)],
    ids=["hybrid-4bit", "hybrid-6bit", "hybrid-8bit", "uniform-4bit"],
)
def test_config_quantization_block(converted, recipe, bits):
    config = json.loads(
        (converted(CONDITIONAL, **quantized(bits, recipe)) / "config.json").read_text()
    )
    expected = {"group_size": GROUP, "bits": bits, "mode": "affine"}
    if recipe == "hybrid" and bits < 8:  # per-layer overrides, as mlx-lm and mlx-vlm read them
        expected.update(
            {
                f"language_model.model.layers.{i}.linear_attn.out_proj": {
                    "group_size": GROUP,
                    "bits": 8,
                }
                for i in LINEAR_LAYERS
            }
        )
    assert config["quantization"] == expected
    assert config["quantization_config"] == expected


def test_float_output_has_no_quantization_block(converted):
    config = json.loads((converted(CONDITIONAL, dtype="float32") / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config


def test_safetensors_carry_the_mlx_marker(converted):
    target = converted(CONDITIONAL, **quantized(4))
    files = sorted(target.glob("*.safetensors"))
    assert files
    for file in files:
        assert mx.load(str(file), return_metadata=True)[1] == {"format": "mlx"}, file
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(target))
    assert set(index["weight_map"].values()) == {f.name for f in files}


def test_tokenizer_files_and_chat_template_copied(make_checkpoint, converted):
    source, _ = make_checkpoint(CONDITIONAL)
    target = converted(CONDITIONAL, **quantized(4))
    names = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ]
    for name in names:
        assert (target / name).read_bytes() == (source / name).read_bytes(), name
    ids = Tokenizer.from_pretrained(target).encode(PROMPT)
    assert ids == Tokenizer.from_pretrained(source).encode(PROMPT)


@pytest.mark.parametrize(
    "kwargs, lines",
    [
        (
            quantized(4),
            [
                "Affine 4-bit quantization, group size 32, recipe `hybrid`",
                "`in_proj_a`/`in_proj_b` kept float; `linear_attn.out_proj` at 8 bits",
                "Vision tower kept float; MTP head kept float",
            ],
        ),
        (quantized(6, "uniform"), ["Affine 6-bit quantization, group size 32, recipe `uniform`"]),
        (dict(dtype="float32"), ["Not quantized: float weights in float32"]),
    ],
    ids=["hybrid-4bit", "uniform-6bit", "float"],
)
def test_model_card_names_the_recipe(converted, kwargs, lines):
    card = (converted(CONDITIONAL, **kwargs) / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: mlx\n")
    for line in lines:
        assert line in card, line
    if kwargs.get("recipe") == "uniform":
        assert "in_proj_a" not in card


def test_conversion_is_deterministic(make_checkpoint, converted, tmp_path):
    source, _ = make_checkpoint(CONDITIONAL)
    first = converted(CONDITIONAL, **quantized(4))
    second = convert(str(source), str(tmp_path / "mlx"), verify_output=False, **quantized(4))
    assert contents(second) == contents(first)  # byte for byte, tensors included


def test_force_replaces_existing_output(make_checkpoint, converted, tmp_path):
    source, _ = make_checkpoint(CONDITIONAL)
    target = tmp_path / "out"
    shutil.copytree(converted(CONDITIONAL, dtype="float32"), target)
    (target / "stale.safetensors").write_bytes(b"left from an older conversion")
    convert(str(source), str(target), force=True, verify_output=False, **quantized(8))
    assert contents(target) == contents(converted(CONDITIONAL, **quantized(8)))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .out.replaced, no staging
    assert load_model(target).layers[0].mlp.up_proj.bits == 8


def test_force_replaces_an_empty_folder(make_checkpoint, tmp_path):
    source, _ = make_checkpoint(CONDITIONAL)
    (tmp_path / "out").mkdir()
    convert(str(source), str(tmp_path / "out"), force=True, verify_output=False, dtype="float32")
    assert is_converted(tmp_path / "out")


def overlap(source: Path, where: str) -> tuple[Path, str]:
    """An --mlx-path that overlaps `source`, and how the error names the overlap."""
    if where == "symlink":
        link = source.parent / "link"
        link.symlink_to(source, target_is_directory=True)
        return link, "is the source checkpoint"
    return {
        "source": (source, "is the source checkpoint"),
        "parent": (source.parent, "contains the source checkpoint"),
        "inside": (source / "mlx", "lies inside the source checkpoint"),
    }[where]


@pytest.mark.parametrize("where", ["source", "symlink", "parent", "inside"])
def test_output_overlapping_the_source_is_refused(make_checkpoint, tmp_path, where):
    source = copy_checkpoint(make_checkpoint, tmp_path / "parent", CONDITIONAL)
    target, problem = overlap(source, where)
    before = tree(tmp_path)
    with pytest.raises(
        ConvertError,
        match=re.escape(
            f"--mlx-path {target} {problem} {source}; writing there could overwrite or delete "
            "the weights being converted. Choose an --mlx-path apart from it: not the source, "
            "not a folder above it, not one inside it"
        ),
    ):
        convert(str(source), str(target), force=True, verify_output=False)
    assert tree(tmp_path) == before  # nothing deleted, nothing written


def unconverted_output(make_checkpoint, target: Path, kind: str) -> None:
    if kind == "hf-checkpoint":
        shutil.copytree(make_checkpoint(CONDITIONAL)[0], target)
    elif kind == "other-folder":
        target.mkdir()
        (target / "config.json").write_text("{}")  # a config alone is not a checkpoint
        (target / "notes.txt").write_text("keep me")
    else:
        target.write_text("a file")


@pytest.mark.parametrize("kind", ["hf-checkpoint", "other-folder", "file"])
def test_force_replaces_only_a_converted_checkpoint(make_checkpoint, tmp_path, kind):
    source = copy_checkpoint(make_checkpoint, tmp_path, CONDITIONAL)
    target = tmp_path / "out"
    unconverted_output(make_checkpoint, target, kind)
    before = tree(tmp_path)
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"{target} exists and is not a converted MLX checkpoint (config.json and safetensors "
            "marked {'format': 'mlx'}); --force only replaces one of those. Choose another "
            f"--mlx-path, or move or delete {target} yourself"
        ),
    ):
        convert(str(source), str(target), force=True, verify_output=False)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 4. Vision tower and MTP head: kept whole, float unless asked.

MTP_SHAPES = mtp_shapes(CONDITIONAL)
MTP_MATRICES = (
    ["mtp.fc"]
    + [f"mtp.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    + [f"mtp.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
)
VISION_MATRICES = [
    f"vision_tower.blocks.{i}.{m}"
    for i in (0, 1)
    for m in ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
] + ["vision_tower.merger.linear_fc1", "vision_tower.merger.linear_fc2"]


@pytest.fixture(scope="module")
def mtp_source(make_checkpoint, tmp_path_factory):
    """CONDITIONAL plus an MTP head, as the released checkpoints carry one."""
    directory = copy_checkpoint(make_checkpoint, tmp_path_factory.mktemp("mtp"), CONDITIONAL)
    return add_mtp_head(directory, mtp_tensors(CONDITIONAL))


@pytest.mark.parametrize(
    "vision, mtp",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["default", "vision", "mtp", "vision+mtp"],
)
def test_vision_and_mtp_quantized_only_when_asked(converted, mtp_source, vision, mtp):
    model = load_model(mtp_source)
    expected = {
        k: v for k, v in tree_flatten(model.parameters()) if k.startswith(("vision_tower.", "mtp."))
    }  # run-time layout, float
    assert {n for n in expected if n.startswith("mtp.")} == set(MTP_SHAPES)
    weights = tensors(
        converted(mtp_source, **quantized(8, quantize_vision=vision, quantize_mtp=mtp))
    )
    chosen = (VISION_MATRICES if vision else []) + (MTP_MATRICES if mtp else [])
    for base in chosen:
        assert bits_on_disk(weights, base) == 8, base
        restored = mx.dequantize(
            weights[f"{base}.weight"],
            weights[f"{base}.scales"],
            weights[f"{base}.biases"],
            group_size=GROUP,
            bits=8,
        )
        assert relative_error(restored, expected[f"{base}.weight"]) < 1e-2, base
    pending = {n for n in weights if n.startswith(("vision_tower.", "mtp."))}
    assert pending == set(expected) | {f"{b}.{p}" for b in chosen for p in ("scales", "biases")}
    for name in set(expected) - {f"{b}.weight" for b in chosen}:  # norms, biases, pos_embed...
        assert weights[name].dtype == mx.float32, name
        assert mx.array_equal(weights[name], expected[name]).item(), name
    assert "vision_tower.pos_embed.scales" not in weights  # read as a grid, never quantized
    assert weights["vision_tower.pos_embed.weight"].shape[-1] % GROUP == 0  # but it could be


# ---------------------------------------------------------------------------------------------
# 5. Dequantization.


def test_dequantize_gives_the_quantized_model_in_float(converted, mtp_source, tmp_path):
    source = converted(mtp_source, **quantized(8, quantize_vision=True, quantize_mtp=True))
    target = convert(str(source), str(tmp_path / "float"), dequantize=True, verify_output=False)
    config = json.loads((target / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    weights, packed = tensors(target), tensors(source)
    assert not [n for n in weights if n.endswith(".scales")]
    assert set(weights) == set(tensors(converted(mtp_source, dtype="float32")))
    for name, value in weights.items():
        assert mx.issubdtype(value.dtype, mx.floating), name
    for base in VISION_MATRICES + MTP_MATRICES:
        restored = mx.dequantize(
            packed[f"{base}.weight"],
            packed[f"{base}.scales"],
            packed[f"{base}.biases"],
            group_size=GROUP,
            bits=8,
        )
        assert relative_error(weights[f"{base}.weight"], restored) <= 1e-5, base
    model = load_model(target)
    assert not [
        p
        for p, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    ids = prompt()
    assert relative_error(np.array(model(mx.array(ids))), logits(source, ids)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 6. Bad input: a clear error, and nothing written anywhere.


# Each case prepares a bad input under tmp_path: (source, convert kwargs, error, message).


def already_converted(make_checkpoint, converted, tmp_path):
    source = Path(shutil.copytree(converted(CONDITIONAL, dtype="float32"), tmp_path / "mlx"))
    return (
        source,
        {},
        ConvertError,
        (
            f"{source} is already a converted MLX checkpoint; converting it again would transform "
            "its weights twice. Load it directly, or pass --dequantize for float weights"
        ),
    )


def missing_shard(make_checkpoint, converted, tmp_path):
    source = copy_checkpoint(make_checkpoint, tmp_path, SHARDED)
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    return (
        source,
        {},
        CheckpointError,
        (
            f"{source}: shard(s) [{shards[1].name!r}] listed in model.safetensors.index.json are "
            "missing; download them again"
        ),
    )


def corrupt_shard(make_checkpoint, converted, tmp_path):
    source = copy_checkpoint(make_checkpoint, tmp_path, SHARDED)
    shard = sorted(source.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return source, {}, CheckpointError, f"{shard}: cannot be read as safetensors"


def unknown_architecture(make_checkpoint, converted, tmp_path):
    source = copy_checkpoint(make_checkpoint, tmp_path, CAUSAL)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return (
        source,
        {},
        CheckpointError,
        (f"{source}: config.json: model_type 'llama' is not a Qwen3.5 model"),
    )


def output_exists(make_checkpoint, converted, tmp_path):
    shutil.copytree(converted(CONDITIONAL, dtype="float32"), tmp_path / "out")
    return (
        copy_checkpoint(make_checkpoint, tmp_path, CONDITIONAL),
        quantized(4),
        FileExistsError,
        (
            f"{tmp_path / 'out'} already exists; choose another --mlx-path or "
            "pass --force to replace it"
        ),
    )


def nothing_to_dequantize(make_checkpoint, converted, tmp_path):
    source, *_ = already_converted(make_checkpoint, converted, tmp_path)
    return (
        source,
        {"dequantize": True},
        ConvertError,
        (f"{source} is not quantized; there is nothing to dequantize"),
    )


@pytest.mark.parametrize(
    "bad_input",
    [
        already_converted,
        missing_shard,
        corrupt_shard,
        unknown_architecture,
        output_exists,
        nothing_to_dequantize,
    ],
    ids=lambda case: case.__name__.replace("_", "-"),
)
def test_bad_input_is_a_clear_error_and_writes_nothing(
    make_checkpoint, converted, tmp_path, bad_input
):
    source, kwargs, error, message = bad_input(make_checkpoint, converted, tmp_path)
    before = tree(tmp_path)
    with pytest.raises(error, match=re.escape(message)):
        convert(str(source), str(tmp_path / "out"), verify_output=False, **kwargs)
    assert tree(tmp_path) == before  # source unchanged, no target, no .out.incomplete


# ---------------------------------------------------------------------------------------------
# 7. Interruption and full disks: never a folder that looks complete, nothing left on errors.

# Writes one tensor per shard and dies (SIGKILL: no cleanup runs) halfway through shard 2.
KILLED_WHILE_WRITING = """
import os, signal, sys
import mlx.core as mx
from qwen35_mlx.convert import convert, writer

writer.SHARD_BYTES = 0  # one tensor per shard
save, saved = mx.save_safetensors, []

def save_then_die(path, *args, **kwargs):
    save(path, *args, **kwargs)
    if saved:
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    saved.append(path)

mx.save_safetensors = save_then_die
convert(sys.argv[1], sys.argv[2], dtype="float32", verify_output=False)
"""


def test_interrupted_conversion_leaves_no_checkpoint(make_checkpoint, tmp_path):
    source, reference = make_checkpoint(CONDITIONAL)
    target, staging = tmp_path / "out", tmp_path / ".out.incomplete"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING, str(source), str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not target.exists()
    assert len(list(staging.glob("*.safetensors"))) == 2  # it died in the middle of writing
    assert not list(tmp_path.rglob("config.json"))  # no leftover looks like a checkpoint
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(staging)

    convert(str(source), str(target), dtype="float32", verify_output=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the rerun cleared the staging
    ids = prompt()
    assert relative_error(logits(target, ids), reference_logits(reference, ids)) <= 1e-5


def fake_disk_usage(free: int, asked: list):
    usage = collections.namedtuple("usage", "total used free")

    def disk_usage(path):
        asked.append(Path(path))
        return usage(total=10 * free + 1, used=9 * free + 1, free=free)

    return disk_usage


def test_too_little_free_space_is_an_error_before_writing(
    make_checkpoint, converted, tmp_path, monkeypatch
):
    source, _ = make_checkpoint(CONDITIONAL)
    index = converted(CONDITIONAL, dtype="float32") / "model.safetensors.index.json"
    needed = json.loads(index.read_text())["metadata"]["total_size"] * HEADROOM
    target = tmp_path / "new" / "out"  # its parent does not exist yet
    parent = tmp_path.resolve() / "new"
    asked = []
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(math.ceil(needed) - 1, asked))
    with pytest.raises(
        WriteError,
        match=re.escape(
            f"writing the checkpoint needs {needed / 1e6:,.1f} MB but {parent} has "
            f"{(math.ceil(needed) - 1) / 1e6:,.1f} MB free; free some space or choose another "
            "--mlx-path"
        ),
    ) as raised:
        convert(str(source), str(target), dtype="float32", verify_output=False)
    assert raised.value.errno == errno.ENOSPC
    assert asked == [tmp_path.resolve()] and not any(tmp_path.iterdir())

    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(math.ceil(needed), asked))
    convert(str(source), str(target), dtype="float32", verify_output=False)  # just enough
    assert is_converted(target)


def test_disk_filling_up_while_writing_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    source, _ = make_checkpoint(CONDITIONAL)
    monkeypatch.setattr(writer, "SHARD_BYTES", 0)  # one tensor per shard
    save, saved = mx.save_safetensors, []

    def save_until_full(path, *args, **kwargs):
        if saved:  # shard 2 fills the disk halfway
            Path(path).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        save(path, *args, **kwargs)
        saved.append(path)

    monkeypatch.setattr(mx, "save_safetensors", save_until_full)
    target = tmp_path / "out"
    with pytest.raises(
        WriteError,
        match=re.escape(
            f"the disk filled up while writing {target}; nothing was left there. Free some "
            "space and run again"
        ),
    ) as raised:
        convert(str(source), str(target), dtype="float32", verify_output=False)
    assert raised.value.errno == errno.ENOSPC
    assert len(saved) == 1 and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# 7b. Shard by shard, in our own code: what is held while writing, sharding and dequantization
# against mlx-lm's.


def test_conversion_holds_at_most_one_shard(make_checkpoint, converted, tmp_path, monkeypatch):
    """Weights stay on disk until their shard is written, and leave memory with it: when each
    shard is written, MLX holds that shard and next to nothing else (before, the whole float
    model was read first)."""
    source, _ = make_checkpoint(CONDITIONAL)
    index = converted(CONDITIONAL, dtype="float32") / "model.safetensors.index.json"
    total = json.loads(index.read_text())["metadata"]["total_size"]
    monkeypatch.setattr(writer, "SHARD_BYTES", total // 8)
    save, held = mx.save_safetensors, []

    def save_noting_memory(path, shard, *args, **kwargs):
        held.append(mx.get_active_memory() - baseline - sum(v.nbytes for v in shard.values()))
        save(path, shard, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save_noting_memory)
    baseline = mx.get_active_memory()
    target = convert(str(source), str(tmp_path / "out"), dtype="float32", verify_output=False)
    assert len(held) == len(list(target.glob("*.safetensors"))) >= 8
    assert max(held) < total // 100, (held, total)  # besides the shard being written
    expected = tensors(converted(CONDITIONAL, dtype="float32"))
    written = tensors(target)
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        assert mx.array_equal(written[name], value).item(), name


def test_convert_package_does_not_import_mlx_lm():
    """Importing anything from mlx_lm imports transformers and torch (seconds)."""
    package = Path(importlib.import_module("qwen35_mlx.convert").__file__).parent
    commands = Path(importlib.import_module("qwen35_mlx.cli").__file__).parent
    for file in [*package.glob("*.py"), commands / "convert.py", commands / "upload.py"]:
        nodes = list(ast.walk(ast.parse(file.read_text())))
        modules = [node.module or "" for node in nodes if isinstance(node, ast.ImportFrom)]
        modules += [
            alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names
        ]
        assert not [m for m in modules if m.split(".")[0] == "mlx_lm"], file


def test_shards_are_cut_by_byte_size():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 3, "f": 5}
    assert writer.plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert writer.plan_shards(sizes, 0) == [[name] for name in sizes]
    assert writer.plan_shards(sizes, 100) == [list(sizes)]


@pytest.mark.parametrize("gigabytes", [0, 1])
def test_shards_match_mlx_lm(converted, gigabytes):
    from mlx_lm.utils import make_shards

    weights = tensors(converted(CONDITIONAL, **quantized(4)))
    ours = writer.plan_shards({k: v.nbytes for k, v in weights.items()}, gigabytes << 30)
    assert ours == [list(shard) for shard in make_shards(weights, gigabytes)]


def test_dequantize_modules_matches_mlx_lm(converted, mtp_source):
    from mlx_lm.utils import dequantize_model

    source = converted(mtp_source, **quantized(4, quantize_vision=True))
    ours, theirs = load_model(source, lazy=True), load_model(source)
    dequantize_modules(ours)
    dequantize_model(theirs)
    expected = dict(tree_flatten(theirs.parameters()))
    found = dict(tree_flatten(ours.parameters()))
    assert found.keys() == expected.keys()
    assert any(name.endswith(".scales") for name in tensors(source))
    for name, value in expected.items():
        assert found[name].dtype == value.dtype, name
        assert mx.array_equal(found[name], value).item(), name
    assert [type(m).__name__ for _, m in ours.named_modules()] == [
        type(m).__name__ for _, m in theirs.named_modules()
    ]


# ---------------------------------------------------------------------------------------------
# 8. What convert prints: the verification line and the per-tensor report.

VERIFY_LINE = re.compile(
    r"\[verify\] (\d+) tokens: logits relative error (\S+), "
    r"KL\(source \|\| converted\) (\S+) nats/token"
)


def mean_kl(reference: np.ndarray, ours: np.ndarray) -> float:
    def log_softmax(x):
        x = x.astype(np.float64)
        shifted = x - x.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(reference), log_softmax(ours)
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize(
    "kwargs", [dict(dtype="float32"), quantized(4)], ids=["float", "hybrid-4bit"]
)
def test_verify_line_reports_the_logit_error(make_checkpoint, tmp_path, capsys, kwargs):
    source, _ = make_checkpoint(CONDITIONAL)
    target = convert(str(source), str(tmp_path / "out"), **kwargs)
    found = VERIFY_LINE.search(capsys.readouterr().out)
    assert found, "no [verify] line"
    ids = [Tokenizer.from_pretrained(source).encode(PROMPT)]
    expected, ours = logits(source, ids), logits(target, ids)
    assert int(found[1]) == len(ids[0])
    assert float(found[2]) == pytest.approx(relative_error(ours, expected), rel=2e-3, abs=1e-9)
    assert float(found[3]) == pytest.approx(mean_kl(expected, ours), rel=2e-3, abs=1e-9)
    if "quantize" in kwargs:
        assert float(found[2]) > 1e-3


def test_report_prints_every_quantized_matrix(make_checkpoint, tmp_path, capsys):
    source, _ = make_checkpoint(CONDITIONAL)
    target = convert(
        str(source), str(tmp_path / "out"), report=True, verify_output=False, **quantized(4)
    )
    lines = capsys.readouterr().out.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split() == ["tensor", "bits", "relative", "error"]
    )
    rows = [line.split() for line in lines[header + 1 :]]
    reported = {name: (int(bits), float(error)) for name, bits, error in rows}
    assert len(reported) == len(rows)
    original, model = load_model(source), load_model(target)
    float_modules = dict(original.named_modules())
    expected = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = float_modules[path].weight
            restored = mx.dequantize(
                module.weight,
                module.scales,
                module.biases,
                group_size=module.group_size,
                bits=module.bits,
            )
            expected[path] = (module.bits, relative_error(restored, weight))
    assert reported.keys() == expected.keys()
    for path, (bits, error) in expected.items():
        assert reported[path][0] == bits, path
        assert reported[path][1] == pytest.approx(error, rel=2e-3), path
    assert {bits for bits, _ in reported.values()} == {4, 8}
    errors = [error for _, error in reported.values()]
    assert errors == sorted(errors, reverse=True)  # worst first


# ---------------------------------------------------------------------------------------------
# 9. Upload, through a hub client made from the installed huggingface_hub's HfApi.


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub.HfApi replaced by a mock specced from the real class: calling a method it
    lacks, or with arguments its signature refuses, fails. Returns the mock client."""
    api_class = create_autospec(huggingface_hub.HfApi)
    monkeypatch.setattr(huggingface_hub, "HfApi", api_class)
    return api_class.return_value


def uploaded_files(api, folder: Path, repo_id: str) -> set[str]:
    """The files the upload sends, picked from `folder` by huggingface_hub's own filter with
    the patterns our upload_folder call passed (as upload_folder picks them)."""
    assert [name for name, *_ in api.method_calls] == ["create_repo", "upload_folder"]
    create, upload = api.create_repo.call_args.kwargs, api.upload_folder.call_args.kwargs
    assert create["repo_id"] == repo_id and create["exist_ok"] is True
    assert create.get("repo_type", "model") == "model"
    assert upload["repo_id"] == repo_id and Path(upload["folder_path"]) == folder
    assert upload.get("repo_type", "model") == "model"
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return set(
        filter_repo_objects(
            files,
            allow_patterns=upload.get("allow_patterns"),
            ignore_patterns=upload.get("ignore_patterns"),
        )
    )


def test_convert_uploads_when_asked(make_checkpoint, tmp_path, hub, capsys):
    source, _ = make_checkpoint(CONDITIONAL)
    target = convert(str(source), str(tmp_path / "out"), upload_repo="me/x", **quantized(4))
    assert uploaded_files(hub, target, "me/x") == set(contents(target))
    out = capsys.readouterr().out
    assert out.index("[verify]") < out.index("https://huggingface.co/me/x")


def test_upload_command(converted, hub):
    target = converted(CONDITIONAL, **quantized(4))
    assert main(["upload", "--path", str(target), "--upload-repo", "me/x"]) == 0
    assert uploaded_files(hub, target, "me/x") == set(contents(target))


def test_upload_sends_only_the_checkpoint_files(converted, tmp_path, hub):
    folder = Path(shutil.copytree(converted(CONDITIONAL, **quantized(4)), tmp_path / "mlx"))
    checkpoint = set(contents(folder))
    assert {
        "config.json",
        "model.safetensors.index.json",
        "README.md",
        "tokenizer.json",
        "chat_template.jinja",
        "preprocessor_config.json",
    } <= checkpoint
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "notes.txt").write_text("draft")
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")
    shard = next(folder.glob("model-*.safetensors"))
    shutil.copy(shard, folder / "old.safetensors")  # a stale shard the index does not list
    assert main(["upload", "--path", str(folder), "--upload-repo", "me/x"]) == 0
    assert uploaded_files(hub, folder, "me/x") == checkpoint


@pytest.mark.parametrize("folder", ["hf-checkpoint", "empty"])
def test_upload_rejects_unconverted_folder(make_checkpoint, tmp_path, hub, capsys, folder):
    path = make_checkpoint(CONDITIONAL)[0] if folder == "hf-checkpoint" else tmp_path
    assert main(["upload", "--path", str(path), "--upload-repo", "me/x"]) == 2
    assert (
        f"qwen35-mlx upload: error: {path} is not a converted checkpoint; run `qwen35-mlx "
        "convert` first"
    ) in capsys.readouterr().err
    assert hub.method_calls == []


def junk_shard(folder: Path) -> str:
    """config.json beside one MLX-marked shard holding a tensor no model has."""
    for file in folder.glob("model*.safetensors*"):
        file.unlink()
    mx.save_safetensors(
        str(folder / "model.safetensors"), {"x": mx.zeros((2,))}, metadata={"format": "mlx"}
    )
    return "tensor(s) missing from the checkpoint"


def wrong_config(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    return "but config.json implies"


@pytest.mark.parametrize(
    "damage", [junk_shard, wrong_config], ids=lambda case: case.__name__.replace("_", "-")
)
def test_upload_rejects_checkpoint_that_does_not_load(converted, tmp_path, hub, capsys, damage):
    folder = Path(shutil.copytree(converted(CONDITIONAL, **quantized(4)), tmp_path / "mlx"))
    problem = damage(folder)
    with pytest.raises(CheckpointError):
        load_model(folder)  # the reference: the loader refuses it too
    assert main(["upload", "--path", str(folder), "--upload-repo", "me/x"]) == 2
    error = capsys.readouterr().err
    assert problem in error and "Not uploaded: convert the checkpoint again" in error
    assert hub.method_calls == []


def overflowing_in_float16(make_checkpoint, tmp_path) -> Path:
    """CONDITIONAL with embeddings past float16's range (65504): float32 logits are fine,
    float16 ones are NaN."""
    source = copy_checkpoint(make_checkpoint, tmp_path, CONDITIONAL)
    name = "model.language_model.embed_tokens.weight"
    rewrite_weights(
        source / "model.safetensors", lambda t: t.update({name: t[name].astype(mx.float32) * 1e6})
    )
    return source


def test_failed_verification_stops_the_upload(make_checkpoint, tmp_path, hub, capsys):
    source = overflowing_in_float16(make_checkpoint, tmp_path)
    ids = mx.array([Tokenizer.from_pretrained(source).encode(PROMPT)])
    assert mx.isnan(load_model(source, dtype="float16")(ids)).any().item()
    target = tmp_path / "out"
    argv = [
        "convert",
        "--hf-path",
        str(source),
        "--mlx-path",
        str(target),
        "--dtype",
        "float16",
        "--upload-repo",
        "me/x",
    ]
    assert main(argv) == 2
    limit = convert_module.MAX_LOGIT_ERROR["float"]
    assert (
        "qwen35-mlx convert: error: verification failed: the converted model's logits are "
        f"nan (relative error; at most {limit} passes) from the source's"
    ) in capsys.readouterr().err
    assert hub.method_calls == []
    assert is_converted(target)  # kept for inspection

    # the same source in float32 verifies and uploads
    argv[argv.index("float16")] = "float32"
    assert main(argv + ["--force"]) == 0
    assert uploaded_files(hub, target, "me/x") == set(contents(target))


def test_logit_error_above_the_threshold_stops_the_upload(
    make_checkpoint, tmp_path, hub, capsys, monkeypatch
):
    monkeypatch.setitem(convert_module.MAX_LOGIT_ERROR, "quantized", 1e-3)  # 4 bits: ~1e-1
    source, _ = make_checkpoint(CONDITIONAL)
    with pytest.raises(ConvertError, match="verification failed") as raised:
        convert(str(source), str(tmp_path / "out"), upload_repo="me/x", **quantized(4))
    reported = VERIFY_LINE.search(capsys.readouterr().out)[2]
    assert f"logits are {reported} (relative error; at most 0.001 passes)" in str(raised.value)
    assert hub.method_calls == []


def test_upload_needs_verification(make_checkpoint, tmp_path, hub):
    source, _ = make_checkpoint(CONDITIONAL)
    with pytest.raises(
        ConvertError,
        match=re.escape("--upload-repo uploads only a verified checkpoint; drop --no-verify"),
    ):
        convert(str(source), str(tmp_path / "out"), upload_repo="me/x", verify_output=False)
    assert not any(tmp_path.iterdir()) and hub.method_calls == []


# ---------------------------------------------------------------------------------------------
# 10. The convert command.


def test_convert_command(make_checkpoint, tmp_path, capsys):
    source, _ = make_checkpoint(CONDITIONAL)
    target = tmp_path / "out"
    argv = [
        "convert",
        "--hf-path",
        str(source),
        "--mlx-path",
        str(target),
        "-q",
        "--q-bits",
        "8",
        "--q-group-size",
        "32",
    ]
    assert main(argv) == 0
    assert VERIFY_LINE.search(capsys.readouterr().out)
    model = load_model(target)
    assert model.layers[0].mlp.up_proj.bits == 8
    assert model.layers[0].mlp.up_proj.group_size == 32

    before = tree(tmp_path)
    assert main(argv) == 2
    assert (
        f"qwen35-mlx convert: error: {target} already exists; choose another --mlx-path or "
        "pass --force to replace it"
    ) in capsys.readouterr().err
    assert tree(tmp_path) == before
