"""Converted checkpoints in the peer runtimes: mlx-vlm (its qwen3_5 model: text, vision tower,
and the MTP drafter it builds from the same folder) and mlx-lm (the text part) load what
`qwen35_mlx.convert` writes, float or quantized, with the same tensors, the same logits and
the same vision features as `qwen35_mlx.loading.load_model`.

mlx-vlm is driven through `mlx_vlm.utils.load_model`, not `mlx_vlm.load`: the latter also builds
a streaming detokenizer that needs contiguous vocabulary ids, which the tiny test tokenizer
(special tokens at 496..508 of 512) does not have.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_vlm.utils
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_vlm.speculative.drafters import load_drafter

from qwen35_mlx.convert import convert
from qwen35_mlx.loading import load_model

from checkpoints import Spec
from helpers import add_mtp_head, mtp_tensors
from metrics import relative_error

SOURCES = {"untied": Spec(layout="conditional"), "tied": Spec(layout="conditional", tied=True)}
Q4 = dict(quantize=True, q_bits=4, q_group_size=32)
RECIPES = {
    "float": {},
    "q4-hybrid": Q4,
    "q4-uniform": {**Q4, "recipe": "uniform"},
    "q4-vision-mtp": {**Q4, "quantize_vision": True, "quantize_mtp": True},
}
GRID = [[1, 4, 4]]  # one 64x64 image: 16 patches, 4 merged tokens
IDS = np.random.default_rng(0).integers(0, 496, size=(1, 64))


@pytest.fixture(scope="module")
def source(make_checkpoint, tmp_path_factory):
    """source(name) -> (HF checkpoint with MTP tensors, torch model, its MTP tensors)."""
    built = {}

    def make(name):
        if name not in built:
            original, reference = make_checkpoint(SOURCES[name])
            directory = Path(shutil.copytree(original, tmp_path_factory.mktemp(name) / "hf"))
            mtp = mtp_tensors(SOURCES[name])
            add_mtp_head(directory, mtp)
            config = json.loads((directory / "config.json").read_text())
            config["text_config"]["mtp_num_hidden_layers"] = 1
            (directory / "config.json").write_text(json.dumps(config))
            built[name] = (directory, reference, mtp)
        return built[name]

    return make


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """converted(source name, recipe) -> (output directory, our model on it)."""
    built = {}

    def make(name, recipe):
        if (name, recipe) not in built:
            out = tmp_path_factory.mktemp(f"{name}-{recipe}") / "mlx"
            convert(
                str(source(name)[0]),
                str(out),
                dtype="float32",
                verify_output=False,
                **RECIPES[recipe],
            )
            built[name, recipe] = (out, load_model(out))
        return built[name, recipe]

    return make


def reference_logits(torch_model) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.tensor(IDS)).logits.float().numpy()


def quantized_layers(model: nn.Module, prefix: str = "") -> dict[str, tuple]:
    return {
        path: (m.bits, m.group_size, m.mode)
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and path.startswith(prefix)
    }


def assert_same_tensors(theirs: dict, ours: dict) -> None:
    assert theirs.keys() == ours.keys(), sorted(set(theirs) ^ set(ours))[:5]
    for name, value in ours.items():
        assert theirs[name].dtype == value.dtype, (name, theirs[name].dtype, value.dtype)
        assert mx.array_equal(theirs[name], value).item(), name


def assert_same_quantization(peer: nn.Module, ours: nn.Module, recipe: str) -> None:
    """The peer quantized exactly our layers, the per-layer 8-bit overrides included."""
    mine = quantized_layers(ours, "language_model.")
    assert quantized_layers(peer, "language_model.") == mine
    if recipe == "float":
        assert not mine
    else:
        bits = 4 if recipe == "q4-uniform" else 8  # the hybrid recipe's override
        assert mine["language_model.model.layers.0.linear_attn.out_proj"] == (bits, 32, "affine")


CASES = [(s, r) for s in SOURCES for r in RECIPES]


@pytest.mark.parametrize("name, recipe", CASES, ids=[f"{s}-{r}" for s, r in CASES])
def test_mlx_vlm_loads_conversion(source, converted, name, recipe):
    out, ours = converted(name, recipe)
    peer = mlx_vlm.utils.load_model(out)
    # every tensor as we hold it: no second norm shift or conv transpose, vision included
    # (the MTP head mlx-vlm builds apart, as a drafter: test_mtp_drafter_from_conversion)
    assert_same_tensors(
        dict(tree_flatten(peer.parameters())),
        {k: v for k, v in tree_flatten(ours.parameters()) if not k.startswith("mtp.")},
    )
    assert_same_quantization(peer, ours, recipe)
    if recipe.endswith("vision-mtp"):
        assert set(quantized_layers(peer, "vision_tower.").values()) == {(4, 32, "affine")}

    logits = np.array(peer.language_model(mx.array(IDS)).logits)
    our_logits = np.array(ours(mx.array(IDS)))
    assert relative_error(logits, our_logits) <= 1e-5
    if recipe == "float":
        reference = reference_logits(source(name)[1])
        assert relative_error(our_logits, reference) <= 1e-4
        assert relative_error(logits, reference) <= 1e-4


@pytest.mark.parametrize("name, recipe", CASES, ids=[f"{s}-{r}" for s, r in CASES])
def test_mlx_lm_loads_conversion(converted, name, recipe):
    out, ours = converted(name, recipe)
    peer, _ = mlx_lm.load(str(out))
    text = dict(tree_flatten(ours.parameters()))
    assert_same_tensors(
        dict(tree_flatten(peer.parameters())),
        {k: v for k, v in text.items() if k.startswith("language_model.")},
    )
    assert_same_quantization(peer, ours, recipe)
    logits = np.array(peer(mx.array(IDS)))
    assert relative_error(logits, np.array(ours(mx.array(IDS)))) <= 1e-5


@pytest.mark.parametrize("recipe", ["float", "q4-vision-mtp"])
def test_vision_tower_matches_mlx_vlm_and_transformers(source, converted, recipe):
    out, ours = converted("untied", recipe)
    _, reference, _ = source("untied")
    peer = mlx_vlm.utils.load_model(out)
    # [patches, C * T * P * P] as the Qwen image processor flattens them
    pixels = np.random.default_rng(1).standard_normal((16, 3 * 2 * 16 * 16)).astype(np.float32)
    features, _ = peer.vision_tower(mx.array(pixels), mx.array(GRID))
    our_features = ours.encode_vision(mx.array(pixels), GRID)
    assert features.shape == our_features.shape == (4, 64)
    assert relative_error(np.array(our_features), np.array(features)) <= 1e-5
    if recipe == "float":
        with torch.no_grad():
            expected = reference.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(GRID))
        assert relative_error(np.array(features), expected.pooler_output.numpy()) <= 1e-4
        assert relative_error(np.array(our_features), expected.pooler_output.numpy()) <= 1e-4


def drafter_tensors(directory: Path) -> tuple[dict, nn.Module]:
    drafter, kind = load_drafter(str(directory))
    assert kind == "mtp"
    return dict(tree_flatten(drafter.parameters())), drafter


def test_mtp_drafter_from_hf_source(source, converted):
    # the drafter mlx-vlm builds from our float conversion is the one it builds from the
    # Hugging Face source, whose norms it shifts to 1 + w
    directory, _, mtp = source("untied")
    from_source, _ = drafter_tensors(directory)
    from_converted, _ = drafter_tensors(converted("untied", "float")[0])
    expected = {
        name[len("mtp.") :]: value + 1.0 if value.ndim == 1 else value  # 1-D: the norms
        for name, value in mtp.items()
    }
    assert len(expected) == 15
    assert_same_tensors(from_source, expected)
    assert_same_tensors(from_converted, expected)


@pytest.mark.parametrize("recipe", RECIPES)
def test_mtp_drafter_from_conversion(converted, recipe):
    out, ours = converted("untied", recipe)
    tensors, drafter = drafter_tensors(out)
    expected = dict(tree_flatten(ours.mtp.parameters()))
    assert_same_tensors(tensors, expected)
    quantized = quantized_layers(drafter)
    if recipe.endswith("vision-mtp"):  # the 8 MTP matrices
        assert len(quantized) == 8 and set(quantized.values()) == {(4, 32, "affine")}
    else:
        assert not quantized


def test_mlx_vlm_conversion_loads_in_ours(source, tmp_path):
    # the other direction: mlx-vlm's own converter output (an mlx-community layout) in our loader
    from mlx_vlm.convert import convert as mlx_vlm_convert

    directory, reference, _ = source("untied")
    out = tmp_path / "mlx-vlm"
    mlx_vlm_convert(str(directory), str(out), dtype="float32")
    ours = load_model(out)
    with torch.no_grad():
        expected = reference(torch.tensor(IDS)).logits.numpy()
    assert relative_error(np.array(ours(mx.array(IDS))), expected) <= 1e-4
    vision = dict(tree_flatten(ours.vision_tower.parameters()))
    assert vision["patch_embed.proj.weight"].shape[-1] == 3  # channels-last, once
    assert len(vision) == len(reference.model.visual.state_dict())
