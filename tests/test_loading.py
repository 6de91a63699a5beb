"""Loading checkpoints: errors that name the file and the fix, converted mlx-lm checkpoints,
tensors of later stages kept, hub repo ids resolved offline, and dtypes."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen35_mlx import load
from qwen35_mlx.loading import CheckpointError, load_model, resolve

from checkpoints import Spec
from helpers import (
    add_mtp_head,
    contents,
    copy_checkpoint,
    mtp_tensors,
    prompt,
    reference_logits,
    rewrite_weights,
)
from metrics import relative_error

CAUSAL = Spec()
CONDITIONAL = Spec(layout="conditional")
SHARDED = Spec(max_shard_size="100KB")  # the same spec as test_model's sharded test


def assert_rejected(
    directory: Path, *fragments: str, call=load_model, error=CheckpointError
) -> None:
    """`call(directory)` raises `error` whose message holds every fragment; no file changes."""
    before = contents(directory)
    with pytest.raises(error) as raised:
        call(directory)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert contents(directory) == before


# ---------------------------------------------------------------------------------------------
# 1. Bad input: a clear error naming the file and the fix; nothing touched.


def test_missing_config(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    (directory / "config.json").unlink()
    assert_rejected(
        directory, f"{directory / 'config.json'} not found", "Point to a folder with config.json"
    )


def test_config_not_json(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    (directory / "config.json").write_text('{"model_type": "qwen3_5_text",')
    assert_rejected(directory, f"{directory / 'config.json'} is not valid JSON", "re-download it")


def test_config_not_utf8(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    file = directory / "config.json"
    file.write_bytes(file.read_bytes().replace(b"qwen3_5_text", b"qwen3_5_\xff"))
    assert_rejected(directory, f"{file} is not UTF-8 text", "re-download it")


def test_config_a_list(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    file = directory / "config.json"
    file.write_text(json.dumps([json.loads(file.read_text())]))
    assert_rejected(directory, f"{directory}: config.json: holds a JSON list, not an object")


def edit_config(directory: Path, edit) -> None:
    file = directory / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def test_unknown_model_type(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    edit_config(directory, lambda c: c.update(model_type="llama"))
    assert_rejected(
        directory,
        "config.json",
        "model_type 'llama' is not a Qwen3.5 model",
        "Qwen3.5 checkpoints only",
    )


@pytest.mark.parametrize(
    "spec, where", [(CAUSAL, ""), (CONDITIONAL, " text_config")], ids=["causal", "conditional"]
)
def test_bad_config_value_names_file_and_field(make_checkpoint, tmp_path, spec, where):
    directory = copy_checkpoint(make_checkpoint, tmp_path, spec)
    edit_config(directory, lambda c: c.get("text_config", c).update(rms_norm_eps=-1e-6))
    assert_rejected(
        directory,
        f"{directory}: config.json{where}: rms_norm_eps = -1e-06 must be > 0",
        "correct it in config.json",
    )


def test_tie_word_embeddings_as_a_string(make_checkpoint, tmp_path):
    # bool("false") is True: the head would silently be tied to the embeddings
    directory = copy_checkpoint(make_checkpoint, tmp_path, CONDITIONAL)
    edit_config(directory, lambda c: c.update(tie_word_embeddings="false"))
    assert_rejected(
        directory,
        f"{directory}: config.json: tie_word_embeddings = 'false' "
        "must be true or false (a JSON boolean, not a string)",
    )


@pytest.mark.parametrize(
    "spec, where",
    [(CAUSAL, None), (CONDITIONAL, None), (CONDITIONAL, "text_config")],
    ids=["causal", "conditional-top", "conditional-text_config"],
)
def test_unknown_config_field(make_checkpoint, tmp_path, spec, where):
    directory = copy_checkpoint(make_checkpoint, tmp_path, spec)
    edit_config(directory, lambda c: (c[where] if where else c).update(sliding_window=128))
    assert_rejected(
        directory,
        "config.json",
        "unknown field(s) ['sliding_window']",
        "remove them from config.json",
    )


def test_missing_tensor(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    rewrite_weights(
        directory / "model.safetensors", lambda t: t.pop("model.layers.1.linear_attn.A_log")
    )
    assert_rejected(
        directory,
        str(directory),
        "1 tensor(s) missing",
        "language_model.model.layers.1.linear_attn.A_log",
        "download is incomplete",
    )


def test_misshapen_tensor(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"  # [I, H] = [128, 64]
    rewrite_weights(directory / "model.safetensors", lambda t: t.update({name: t[name][:127]}))
    assert_rejected(
        directory,
        f"{directory / 'model.safetensors'}: tensor "
        "'language_model.model.layers.0.mlp.up_proj.weight' has shape (127, 64) "
        "but config.json implies (128, 64)",
        "do not belong together",
    )


@pytest.mark.parametrize("damage", ["missing", "misshapen"])
def test_bad_vision_tensor_fails_at_load(make_checkpoint, tmp_path, damage):
    # the vision tower is read on first use, but checked at load (from the headers)
    directory = copy_checkpoint(make_checkpoint, tmp_path, CONDITIONAL)
    name = "model.visual.blocks.1.mlp.linear_fc1.weight"  # [64, 32]
    edit = {
        "missing": lambda t: t.pop(name),
        "misshapen": lambda t: t.update({name: t[name][:63]}),
    }[damage]
    rewrite_weights(directory / "model.safetensors", edit)
    assert_rejected(
        directory,
        "vision_tower.blocks.1.mlp.linear_fc1.weight",
        {"missing": "1 tensor(s) missing", "misshapen": "has shape (63, 32)"}[damage],
    )


def test_unexpected_tensor(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    rewrite_weights(
        directory / "model.safetensors",
        lambda t: t.update({"model.layers.0.mlp.extra.weight": mx.zeros((4,))}),
    )
    assert_rejected(
        directory,
        "language_model.model.layers.0.mlp.extra.weight",
        "config.json does not match the weights",
    )


def test_weights_of_another_layout(make_checkpoint, tmp_path):
    # a conditional config.json over text-only (`model.*`) weights
    directory = copy_checkpoint(make_checkpoint, tmp_path, CAUSAL)
    conditional, _ = make_checkpoint(CONDITIONAL)
    shutil.copy(conditional / "config.json", directory / "config.json")
    assert_rejected(
        directory, "model.language_model.", "config.json and the weights do not belong together"
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_safetensors(make_checkpoint, tmp_path, damage):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": np.random.default_rng(0).bytes(len(data)),
            "empty": b"",
        }[damage]
    )
    assert_rejected(
        directory,
        f"{file}: cannot be read as safetensors",
        "truncated or corrupt, download it again",
    )


def test_sharded_checkpoint_missing_shard(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path, SHARDED)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    assert_rejected(
        directory, f"[{shards[1].name!r}]", "model.safetensors.index.json", "download them again"
    )


def test_corrupt_shard_index(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path, SHARDED)
    (directory / "model.safetensors.index.json").write_text("{not json")
    assert_rejected(
        directory,
        "model.safetensors.index.json is not a valid safetensors index",
        "download it again",
    )


def edit_index(directory: Path, edit) -> Path:
    index = directory / "model.safetensors.index.json"
    fields = json.loads(index.read_text())
    edit(fields["weight_map"])
    index.write_text(json.dumps(fields))
    return index


def point_first_tensor_at(name: str):
    return lambda weight_map: weight_map.update({next(iter(weight_map)): name})


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_outside_the_folder(make_checkpoint, tmp_path, where):
    # a real, readable safetensors file outside the checkpoint: it must not be read
    directory = copy_checkpoint(make_checkpoint, tmp_path, SHARDED)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(sorted(directory.glob("model-*.safetensors"))[0], outside)
    name = "../outside.safetensors" if where == "parent" else str(outside)
    index = edit_index(directory, point_first_tensor_at(name))
    assert_rejected(
        directory,
        f"{index}: shard {name!r} lies outside {directory}",
        "Download model.safetensors.index.json again",
    )


def test_shard_in_a_subfolder_is_inside(make_checkpoint, tmp_path):
    _, reference = make_checkpoint(SHARDED)
    directory = copy_checkpoint(make_checkpoint, tmp_path, SHARDED)
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    (directory / "sub").mkdir()
    shard.rename(directory / "sub" / shard.name)
    edit_index(
        directory,
        lambda weight_map: weight_map.update(
            {k: f"sub/../sub/{v}" for k, v in weight_map.items() if v == shard.name}
        ),
    )
    ids = prompt()
    logits = np.array(load_model(directory)(mx.array(ids)))
    assert relative_error(logits, reference_logits(reference, ids)) <= 1e-4


def test_shard_not_safetensors(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path, SHARDED)
    (directory / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    index = edit_index(directory, point_first_tensor_at("model.gguf"))
    assert_rejected(directory, f"{index}: shard 'model.gguf' is not a .safetensors file")


def test_float_weight_stored_as_int32(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_weights(
        directory / "model.safetensors", lambda t: t.update({name: t[name].view(mx.int32)})
    )
    assert_rejected(
        directory,
        f"{directory / 'model.safetensors'}: tensor "
        "'language_model.model.layers.0.mlp.up_proj.weight' is stored as "
        "mlx.core.int32 but the model needs a floating-point dtype",
    )


def test_mtp_weight_stored_as_int32(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    mtp = {**mtp_tensors(), "mtp.fc.weight": mx.zeros((64, 128), mx.int32)}
    add_mtp_head(directory, mtp)
    assert_rejected(directory, "'mtp.fc.weight' is stored as mlx.core.int32")


def test_tensor_in_two_shards(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path, SHARDED)
    first, second = sorted(directory.glob("model-*.safetensors"))[:2]
    name = sorted(mx.load(str(first)))[0]
    copy = mx.load(str(first))[name]
    rewrite_weights(second, lambda t: t.update({name: copy}))
    assert_rejected(
        directory,
        f"{second}: tensor(s) [{name!r}] are also stored in {first.name}",
        "download it again",
    )


def rewrite_header(file: Path, edit) -> None:
    """Rewrites a safetensors file's JSON header with `edit(header)`, data bytes unchanged."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])


def two_tensors(header: dict) -> tuple[dict, dict]:
    """Two tensors of the same dtype and byte size, in offset order."""

    def size(entry: dict) -> int:
        return entry["data_offsets"][1] - entry["data_offsets"][0]

    entries = [v for k, v in header.items() if k != "__metadata__"]
    return next(
        (a, b)
        for a in entries
        for b in entries
        if a["dtype"] == b["dtype"]
        and size(a) == size(b) > 0
        and a["data_offsets"] < b["data_offsets"]
    )


def share_bytes(header: dict) -> None:
    first, second = two_tensors(header)
    second["data_offsets"] = list(first["data_offsets"])


def past_the_end(header: dict) -> None:
    _, second = two_tensors(header)
    second["data_offsets"] = [o + 10**6 for o in second["data_offsets"]]


def short_data(header: dict) -> None:
    _, second = two_tensors(header)
    second["data_offsets"][1] -= 2


@pytest.mark.parametrize(
    "edit, problem",
    [
        (share_bytes, "share data bytes"),
        (past_the_end, "outside the"),
        (short_data, "bytes but its dtype"),
    ],
    ids=["overlap", "out-of-range", "size"],
)
def test_bad_data_offsets(make_checkpoint, tmp_path, edit, problem):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    file = directory / "model.safetensors"
    rewrite_header(file, edit)
    assert_rejected(
        directory, f"{file}: cannot be read as safetensors", problem, "download it again"
    )


def test_name_twice_in_one_header(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    file = directory / "model.safetensors"
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + length].decode()
    first = json.loads(text)
    name = next(k for k in first if k != "__metadata__")
    repeated = f", {json.dumps(name)}: {json.dumps(first[name])}}}"
    twice = (text.rstrip().removesuffix("}") + repeated).encode()
    file.write_bytes(len(twice).to_bytes(8, "little") + twice + data[8 + length :])
    assert_rejected(
        directory, f"{file}: cannot be read as safetensors", f"names [{name!r}] more than once"
    )


def test_no_weights(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    (directory / "model.safetensors").unlink()
    assert_rejected(
        directory, "no model.safetensors or model.safetensors.index.json", "the weights are missing"
    )


def test_missing_tokenizer(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    (directory / "tokenizer.json").unlink()
    assert_rejected(
        directory,
        f"{directory / 'tokenizer.json'} not found",
        "hf download",
        call=load,
        error=FileNotFoundError,
    )
    assert_rejected(directory, f"{directory / 'tokenizer.json'} not found", call=load)


def test_corrupt_tokenizer(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    (directory / "tokenizer.json").write_text("")
    assert_rejected(
        directory,
        f"{directory / 'tokenizer.json'} cannot be read as a tokenizer",
        "Download it again",
        call=load,
    )


# ---------------------------------------------------------------------------------------------
# 2. Checkpoints converted by mlx-lm: read as they are, never transformed a second time.
# mlx-lm 0.32 converts only the conditional layout (it has no `qwen3_5_text` model type).


def mlx_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    assert files
    return files


def test_mlx_lm_converted_checkpoint(make_checkpoint, tmp_path):
    source, reference = make_checkpoint(CONDITIONAL)
    converted = tmp_path / "mlx"
    mlx_lm.convert(str(source), str(converted), dtype="float32")
    for file in mlx_files(converted):
        assert mx.load(str(file), return_metadata=True)[1].get("format") == "mlx"

    model = load_model(converted)
    ids = prompt()
    assert relative_error(np.array(model(mx.array(ids))), reference_logits(reference, ids)) <= 1e-4
    # the same run-time weights as loading the Hugging Face files: no second norm shift or
    # conv transpose; mlx-lm drops the vision weights, so the text model loads
    assert model.vision_tower is None
    ours = dict(tree_flatten(load_model(source).language_model.parameters()))
    theirs = dict(tree_flatten(model.language_model.parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert theirs[name].dtype == value.dtype and mx.array_equal(theirs[name], value).item(), (
            name
        )


# mlx-lm recipes: uniform 4 bits; mixed 3/6 bits (per-layer params in config.json); mxfp4 (no
# biases, bfloat16 output); and a predicate that leaves one projection unquantized.
QUANTIZE = {
    "4bit": dict(q_bits=4),
    "mixed_3_6": dict(quant_predicate="mixed_3_6"),
    "mxfp4": dict(q_mode="mxfp4"),
    "partial": dict(quant_predicate=lambda path, _: not path.endswith("in_proj_b")),
}


@pytest.mark.parametrize("recipe", QUANTIZE)
def test_mlx_lm_quantized_checkpoint(make_checkpoint, tmp_path, recipe):
    source, reference = make_checkpoint(CONDITIONAL)
    converted = tmp_path / "mlx-quantized"
    mlx_lm.convert(str(source), str(converted), quantize=True, dtype="float32", **QUANTIZE[recipe])
    quantization = json.loads((converted / "config.json").read_text())["quantization"]
    on_disk = {}
    for file in mlx_files(converted):
        on_disk.update(mx.load(str(file)))

    model = load_model(converted)
    for path, module in model.named_modules():
        is_quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        assert is_quantized == (f"{path}.scales" in on_disk), path
        if is_quantized:  # the layer's own params where mlx-lm wrote them, else the global ones
            params = quantization.get(path, quantization)
            assert (module.bits, module.mode) == (params["bits"], params.get("mode", "affine")), (
                path
            )
    assert isinstance(model.layers[3].self_attn.q_proj, nn.QuantizedLinear)
    assert model.language_model.model.norm.weight.dtype == mx.float32
    ids = prompt()
    logits = np.array(model(mx.array(ids)).astype(mx.float32))
    assert np.isfinite(logits).all()
    assert relative_error(logits, reference_logits(reference, ids)) < 0.5


# ---------------------------------------------------------------------------------------------
# 3. Vision tensors are loaded into the vision tower (the MTP head: tests/test_mtp.py).


def test_vision_tensors_loaded(make_checkpoint):
    # in mlx-vlm's layout: vision_tower.*, the Conv3d patch embedding channels-last
    directory, reference = make_checkpoint(CONDITIONAL)
    model = load_model(directory)
    visual = {k: v.detach().numpy() for k, v in reference.model.visual.state_dict().items()}
    visual["patch_embed.proj.weight"] = visual["patch_embed.proj.weight"].transpose(0, 2, 3, 4, 1)
    loaded = dict(tree_flatten(model.vision_tower.parameters()))
    assert visual and set(loaded) == set(visual) and model.mtp is None
    for name, value in visual.items():
        assert np.array_equal(np.array(loaded[name]), value), name


# ---------------------------------------------------------------------------------------------
# 4. Hugging Face repo ids, through a hub cache and offline.

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(make_checkpoint, tmp_path, monkeypatch):
    """A hub cache holding CAUSAL as "owner/name"; returns (snapshot folder, torch model)."""
    source, reference = make_checkpoint(CAUSAL)
    cache = tmp_path / "hub"
    repo = cache / "models--owner--name"
    snapshot = Path(shutil.copytree(source, repo / "snapshots" / COMMIT))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, at import: patch what it read.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot, reference


@pytest.mark.parametrize("revision", [None, COMMIT], ids=["refs-main", "commit"])
def test_repo_id_resolves_offline(offline_hub, revision):
    snapshot, reference = offline_hub
    assert resolve("owner/name", revision) == snapshot
    model, tokenizer = load("owner/name", revision=revision)
    ids = prompt()
    assert relative_error(np.array(model(mx.array(ids))), reference_logits(reference, ids)) <= 1e-4
    assert tokenizer.encode("<|im_start|>") == [501]  # tests/tokenizer_files.py


def test_repo_missing_offline_is_a_clear_error(offline_hub):
    with pytest.raises(CheckpointError, match="owner/other: cannot download.*local checkpoint"):
        resolve("owner/other")


@pytest.fixture
def no_hub(monkeypatch):
    def snapshot_download(*args, **kwargs):
        raise AssertionError(f"hub called for {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize("name", ["./nope", "nope", "/no/such/dir", "a/b/c", "~/nope"])
def test_missing_local_path_is_not_a_hub_call(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CheckpointError,
        match="not a checkpoint directory and not a Hugging "
        r"Face repo id \(owner/name\)",
    ):
        load(name)


def test_file_instead_of_directory(make_checkpoint, no_hub):
    directory, _ = make_checkpoint(CAUSAL)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load(directory / "config.json")


# ---------------------------------------------------------------------------------------------
# 5. dtype: matrices follow it, norms and A_log stay float32 and unrounded.


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_casts_matrices_only(make_checkpoint, dtype):
    directory, _ = make_checkpoint(CAUSAL)
    full = dict(tree_flatten(load_model(directory, dtype="float32").parameters()))
    half = dict(tree_flatten(load_model(directory, dtype=dtype).parameters()))
    kept = [n for n in half if n.endswith(("norm.weight", "A_log"))]
    assert any(n.endswith("A_log") for n in kept) and any("linear_attn.norm" in n for n in kept)
    for name, value in half.items():
        if name in kept:
            assert value.dtype == mx.float32 and mx.array_equal(value, full[name]).item(), name
        else:
            assert value.dtype == getattr(mx, dtype), name
            assert mx.array_equal(value, full[name].astype(value.dtype)).item(), name


@pytest.mark.parametrize("dtype", ["fp8", "float64", "bf16"])
def test_invalid_dtype(make_checkpoint, dtype):
    directory, _ = make_checkpoint(CAUSAL)
    with pytest.raises(
        CheckpointError,
        match=f"dtype '{dtype}' is not supported; use one of "
        r"\['bfloat16', 'float16', 'float32'\]",
    ):
        load_model(directory, dtype=dtype)
