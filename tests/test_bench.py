"""Random-weight checkpoints are real Hugging Face Qwen3.5 checkpoints, and the bench runs.

transformers loading the folder with no missing or unexpected keys proves the layout; its
logits agreeing with ours proves the config fields mean what they say.
"""

import json
import math
import re
import struct

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3_5ForConditionalGeneration

from benchmarks import convert as convert_benchmark
from benchmarks import generate as generate_benchmark
from benchmarks import kernels as kernels_benchmark
from benchmarks import vision as vision_benchmark
from qwen35_mlx import cli, generate, load
from qwen35_mlx.bench import kernel_counters, model_primitives, random_checkpoint, tokenizer_files
from qwen35_mlx.bench.random_checkpoint import (
    TEXT_COMMON,
    config_json,
    tensor_specs,
    write_random_checkpoint,
)
from qwen35_mlx.gated_delta import SCAN_PATHS

from helpers import add_mtp_head, copy_checkpoint, mtp_tensors
from metrics import relative_error

# the released vocabulary: the released tokenizer's special tokens (image pad, ...) are in it
TINY_TEXT = dict(
    vocab_size=TEXT_COMMON["vocab_size"],
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    max_position_embeddings=4096,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10_000_000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
)
TINY_VISION = dict(
    depth=1, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16
)
# (size whose other fields are kept, DeltaNet value heads): tied head with Hv = Hk like the
# 0.8B, untied lm_head with Hv = 2 Hk like the 9B
VARIANTS = {"0.8B-tied": ("0.8B", 2), "9B-untied": ("9B", 4)}


def write_text_only_checkpoint(directory):
    """A 4-layer, 64-wide float32 text model with the released vocabulary and tokenizer files
    (the grammar library needs the real vocabulary); no vision tower, no MTP head."""
    return write_random_checkpoint(
        directory,
        "0.8B",
        num_layers=4,
        vision=False,
        mtp=False,
        dtype="float32",
        overrides={"text_config": {**TINY_TEXT, "linear_num_value_heads": 2}},
    )


def tiny(variant: str) -> dict:
    size, value_heads = VARIANTS[variant]
    return dict(
        size=size,
        num_layers=4,
        overrides={
            "text_config": {**TINY_TEXT, "linear_num_value_heads": value_heads},
            "vision_config": TINY_VISION,
        },
    )


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt", **tiny("0.8B-tied"))


def header(file) -> dict:
    with open(file, "rb") as f:
        return json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))


# Exact counts of the released checkpoints (docs/ARCHITECTURE.md §1.4): (decoder, embeddings,
# vision tower, MTP head), and the total = Hugging Face's safetensors.total.
RELEASED = {
    "0.8B": ((498_113_344, 254_279_680, 100_592_896, 20_452_864), 873_438_784),
    "2B": ((1_373_265_728, 508_559_360, 331_416_576, 60_828_160), 2_274_069_824),
    "4B": ((3_570_052_096, 635_699_200, 333_514_240, 120_599_552), 4_659_865_088),
    "9B": ((6_919_565_824, 2 * 1_017_118_720, 456_010_480, 243_290_624), 9_653_104_368),
}


@pytest.mark.parametrize("size", RELEASED)
def test_shapes_add_up_to_the_released_parameter_counts(size):
    parts = {"decoder": 0, "embeddings": 0, "vision": 0, "mtp": 0}
    for name, shape, _ in tensor_specs(config_json(size)):
        if name.startswith("model.visual."):
            parts["vision"] += math.prod(shape)
        elif name.startswith("mtp."):
            parts["mtp"] += math.prod(shape)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            parts["embeddings"] += math.prod(shape)
        else:
            parts["decoder"] += math.prod(shape)
    counts, total = RELEASED[size]
    assert tuple(parts.values()) == counts
    assert sum(parts.values()) == total
    no_extras = tensor_specs(config_json(size, vision=False, mtp=False))
    assert sum(math.prod(shape) for _, shape, _ in no_extras) == total - counts[2] - counts[3]


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_it_and_agrees_with_us(tmp_path, variant):
    directory = write_random_checkpoint(tmp_path / "ckpt", dtype="float32", **tiny(variant))
    reference, info = Qwen3_5ForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (
        set(),
        set(),
        set(),
    )
    model, _ = load(directory)
    ids = np.random.default_rng(0).integers(0, 512, size=(1, 70))  # crosses a 64-token chunk
    with torch.no_grad():
        expected = reference.eval()(torch.tensor(ids)).logits.numpy()
    assert relative_error(np.array(model(mx.array(ids))), expected) <= 1e-4


def test_disk_dtypes_and_layout_are_the_release_ones(bf16_checkpoint):
    directory = bf16_checkpoint
    dtypes = {
        name: spec["dtype"]
        for name, spec in header(directory / "model.safetensors").items()
        if name != "__metadata__"
    }
    f32 = {name for name, dtype in dtypes.items() if dtype == "F32"}
    assert f32 == {
        f"model.language_model.layers.{i}.linear_attn.{t}"
        for i in range(3)
        for t in ("A_log", "norm.weight")
    }
    assert set(dtypes.values()) == {"F32", "BF16"}
    assert "lm_head.weight" not in dtypes  # tied, as the 0.8B release
    config = json.loads((directory / "config.json").read_text())
    assert config["text_config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]


def test_same_seed_same_bytes_and_a_full_folder_is_refused(tmp_path, bf16_checkpoint):
    again = write_random_checkpoint(tmp_path / "again", **tiny("0.8B-tied"))
    assert (again / "model.safetensors").read_bytes() == (
        bf16_checkpoint / "model.safetensors"
    ).read_bytes()
    with pytest.raises(ValueError, match="not an empty folder"):
        write_random_checkpoint(bf16_checkpoint, **tiny("0.8B-tied"))
    with pytest.raises(ValueError, match="multiple of 4"):
        write_random_checkpoint(tmp_path / "c", num_layers=6)


def test_large_checkpoints_are_sharded_with_an_index(tmp_path, monkeypatch, bf16_checkpoint):
    monkeypatch.setattr(random_checkpoint, "SHARD_BYTES", 100_000)
    directory = write_random_checkpoint(tmp_path / "ckpt", **tiny("0.8B-tied"))
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and not (directory / "model.safetensors").exists()
    ids = mx.array(np.random.default_rng(0).integers(0, 512, size=(1, 8)))
    sharded, _ = load(directory)
    single, _ = load(bf16_checkpoint)  # same seed, one file: the same model
    assert mx.array_equal(sharded(ids), single(ids))


@pytest.mark.parametrize("variant, thinking", [("0.8B-tied", False), ("9B-untied", True)])
def test_it_carries_the_released_tokenizer_and_chat_template(tmp_path, variant, thinking):
    directory = write_random_checkpoint(tmp_path / "ckpt", **tiny(variant))
    model, tokenizer = load(directory)
    config = json.loads((directory / "config.json").read_text())
    for name, key in [
        ("<|image_pad|>", "image_token_id"),
        ("<|video_pad|>", "video_token_id"),
        ("<|vision_start|>", "vision_start_token_id"),
        ("<|vision_end|>", "vision_end_token_id"),
    ]:
        assert tokenizer.encode(name) == [config[key]]
    assert tokenizer.encode("<|im_end|>") == [248046]
    assert tokenizer.eos_token_ids == {248046, config["text_config"]["eos_token_id"]}
    template = (
        tokenizer_files.THINKING_TEMPLATE if thinking else tokenizer_files.NON_THINKING_TEMPLATE
    )
    assert (directory / "chat_template.jinja").read_bytes() == template.read_bytes()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    generation_prompt = "<|im_start|>assistant\n<think>\n"
    assert prompt.endswith(generation_prompt + ("" if thinking else "\n</think>\n\n"))
    result = generate(model, tokenizer, [{"role": "user", "content": "Hello"}], max_tokens=3)
    assert result.generation_tokens >= 1


def test_bench_generate_times_our_setup(bf16_checkpoint, capsys):
    assert (
        cli.main(
            [
                "bench",
                "generate",
                "--model",
                str(bf16_checkpoint),
                "--prompt-tokens",
                "16",
                "--generation-tokens",
                "4",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "4 of 4" in table and "mlx-lm" not in table


def test_generate_benchmark_races_mlx_lm(bf16_checkpoint, capsys):
    assert (
        generate_benchmark.main(
            ["--model", str(bf16_checkpoint), "--prompt-tokens", "16", "--generation-tokens", "4"]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "4 of 4" in table and "ours/mlx-lm" in table


def test_convert_benchmark_runs_end_to_end(bf16_checkpoint, tmp_path, capsys):
    assert (
        convert_benchmark.main(
            ["--hf-path", str(bf16_checkpoint), "--bits", "8", "--out-dir", str(tmp_path / "out")]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    rows = {
        tuple(line.split()[:3]): line.split()[3:]
        for line in lines
        if line.startswith(("qwen35_mlx ", "mlx-lm "))
    }
    assert set(rows) == {
        ("qwen35_mlx", "-", "bfloat16"),
        ("mlx-lm", "-", "bfloat16"),
        ("qwen35_mlx", "hybrid", "8"),
        ("qwen35_mlx", "uniform", "8"),
        ("mlx-lm", "default", "8"),
    }
    for (tool, _, _), cells in rows.items():  # vision, mtp: ours keeps both, mlx-lm drops them
        assert cells[2:4] == (["yes", "yes"] if tool == "qwen35_mlx" else ["no", "no"])
    # our float output computes exactly what the source does
    assert float(rows[("qwen35_mlx", "-", "bfloat16")][-2]) == 0.0
    assert sum(line.startswith("ours ") for line in lines) == 3  # float, hybrid, uniform
    assert len(list((tmp_path / "out").iterdir())) == 5


def test_vision_benchmark_runs_end_to_end(bf16_checkpoint, capsys):
    assert (
        vision_benchmark.main(
            ["--model", str(bf16_checkpoint), "--image-size", "64", "--repeats", "2"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "grid (1, 4, 4) = 16 patches -> 4 tokens" in lines[0]
    rows = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line.startswith(("qwen35_mlx ", "mlx-vlm ", "ours/mlx-vlm "))
    }
    assert set(rows) == {"qwen35_mlx", "mlx-vlm", "ours/mlx-vlm"}
    for column in range(3):  # best s, median s, work GB: the ratio row is ours / theirs
        ours, theirs = float(rows["qwen35_mlx"][column]), float(rows["mlx-vlm"][column])
        assert ours > 0 and theirs > 0
        assert float(rows["ours/mlx-vlm"][column].rstrip("x")) == pytest.approx(
            ours / theirs, rel=5e-3, abs=1e-3
        )
    assert float(rows["qwen35_mlx"][0]) <= float(rows["qwen35_mlx"][1])  # best <= median
    error = float(next(line for line in lines if line.startswith("features:")).split()[-1])
    assert error <= 1e-2  # the same features in bfloat16: both ran the same tower


def test_kernels_benchmark_table(capsys):
    assert kernels_benchmark.main(["--tokens", "16", "3", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines]
    timings = {
        (c[0], c[1], int(c[2])): (float(c[3]), float(c[4].rstrip("x")), float(c[5]))
        for c in cells
        if c[0] in ("0.8B", "9B")
    }
    names = [f"ours {path}" for path in SCAN_PATHS] + ["mx.fast", "mlx-lm"]
    assert set(timings) == {
        (size, name, T) for size in ("0.8B", "9B") for name in names for T in (16, 3)
    }
    for size, _, T in timings:  # each ratio is the fastest peer's time over the row's
        fastest_peer = min(timings[size, peer, T][0] for peer in ("mx.fast", "mlx-lm"))
        for name in names:
            ms, ratio, peak_gb = timings[size, name, T]
            assert ratio_agrees(ratio, 0.005, fastest_peer, ms, 0.005)  # ms and ratio to 0.01
            assert peak_gb > 0
    decode_paths = ("ours plain", "ours fused", "mlx-lm", "mlx-lm metal")
    counts = {
        c[0]: (int(c[1]), float(c[2].rstrip("x")), float(c[3].rstrip("x")))
        for c in cells
        if c[0] in decode_paths
    }
    assert set(counts) == set(decode_paths)
    for count, vs_mlx_lm, vs_mlx_lm_metal in counts.values():
        assert vs_mlx_lm == pytest.approx(count / counts["mlx-lm"][0], abs=6e-3)
        assert vs_mlx_lm_metal == pytest.approx(count / counts["mlx-lm metal"][0], abs=6e-3)
    # the target: fewer primitives than mlx-lm on the Metal path
    assert counts["ours fused"][0] < counts["mlx-lm metal"][0]


# DeltaNet heads small enough to emulate in seconds: Hv = Hk and Hv = 2 Hk, as 0.8B and 9B
TINY_HEADS = {
    "0.8B": kernel_counters.Heads(1, 1, 16, 16, 4),
    "9B": kernel_counters.Heads(1, 2, 16, 16, 4),
}


def test_bench_kernels_prints_counters(monkeypatch, capsys):
    monkeypatch.setattr(kernel_counters, "heads_of", TINY_HEADS.__getitem__)
    # the whole-model primitives it prints next are tests/test_count.py's
    monkeypatch.setattr(model_primitives, "bench_decode_primitives", lambda sizes: None)
    assert cli.main(["bench", "kernels", "--tokens", "40", "--batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines]
    launches = {(c[0], c[1]): c[2:] for c in cells if len(c) == 16 and c[1] in TINY_HEADS}
    buffers = {(c[0], c[1], c[2]): c[3:] for c in cells if len(c) == 5 and c[1] in TINY_HEADS}
    kernels = ("decode step", "gated norm", "chunk prepare", "chunked scan")
    decode = ("decode step", "gated norm")
    token = {size: np.zeros(2) for size in TINY_HEADS}  # one decoded token: requested, distinct

    def state_bytes(h):  # B = 2: the float32 recurrent state, the bfloat16 conv state
        channels = 2 * h.key_heads * h.key_dim + h.value_heads * h.value_dim
        return 2 * h.value_heads * h.value_dim * h.key_dim * 4, 2 * (h.conv_taps - 1) * channels * 2

    assert set(launches) == {(k, s) for k in kernels for s in TINY_HEADS}
    for (kernel, size), row in launches.items():
        h = TINY_HEADS[size]
        groups, threads, _, per_group, per_chunk, read, written, ratio, distinct = row[:9]
        distinct_ratio = row[9]
        state, conv_state = state_bytes(h)
        # the decode launches carry the layer's whole state, the chunked prefill the recurrent one
        carried = state + conv_state if kernel in decode else state
        # by hand: 2 or 4 heads are fewer than 64, so the decode step splits each over 4
        # threadgroups of 4 rows (Dv = 16), a simdgroup per row, one barrier; the gated norm
        # follows, a simdgroup per head. Chunked: chunks of 32 tokens (64 overflow 32 KiB), two
        # at T = 40; the prepare kernel a threadgroup of 4 simdgroups per head and chunk, two
        # barriers; the scan 2 simdgroups owning all 16 columns, two barriers per chunk
        heads = 2 * h.value_heads
        expected = {
            "decode step": (4 * heads, 128, "1", "-"),
            "gated norm": (heads, 32, "0", "-"),
            "chunk prepare": (2 * heads, 128, "2", "-"),
            "chunked scan": (heads, 64, "4", "2.00"),
        }[kernel]
        assert (int(groups), int(threads), per_group, per_chunk) == expected
        if kernel in ("decode step", "chunked scan"):
            assert buffers[kernel, size, "state_in"] == [str(state), "0"]
            assert buffers[kernel, size, "state_out"] == ["0", str(state)]
        moved = sum(
            int(r) + int(w) for (k, s, _), (r, w) in buffers.items() if (k, s) == (kernel, size)
        )
        assert int(read) + int(written) == moved
        assert float(ratio.rstrip("x")) == pytest.approx(moved / (2 * carried), abs=6e-4)
        # each byte once: no more than requested; the state read and written once among them
        assert int(distinct) <= moved
        assert kernel in ("gated norm", "chunk prepare") or int(distinct) >= 2 * state
        distinct_ratio = float(distinct_ratio.rstrip("x"))
        assert distinct_ratio == pytest.approx(int(distinct) / (2 * carried), abs=6e-4)
        if kernel == "decode step":  # the split's threadgroups re-read their head's q and k
            assert int(distinct) < moved
        if kernel in decode:
            token[size] += (moved, int(distinct))
    for size, (moved, distinct) in token.items():
        layer_state = 2 * sum(state_bytes(TINY_HEADS[size]))
        line = next(x for x in lines if x.startswith(f"One decoded token, {size} heads"))
        found = re.search(r"requested ([\d.]+)x, distinct ([\d.]+)x", line)
        assert float(found[1]) == pytest.approx(moved / layer_state, abs=6e-4)
        assert float(found[2]) == pytest.approx(distinct / layer_state, abs=6e-4)
    assert "Threadgroup-memory bank conflicts by kernel line:" in lines


def test_bench_kernels_without_emulator_says_so(monkeypatch, capsys):
    monkeypatch.setattr(kernel_counters, "load_emulator", lambda: None)
    monkeypatch.setattr(model_primitives, "bench_decode_primitives", lambda sizes: None)
    assert cli.main(["bench", "kernels"]) == 0
    assert capsys.readouterr().out.strip() == kernel_counters.NO_EMULATOR


def ratio_agrees(ratio, ratio_half_step, numerator, denominator, half_step):
    """Whether a printed ratio is one that the printed (rounded) numerator and denominator allow:
    each printed figure is within half its last digit of the value it was computed from."""
    lowest = (numerator - half_step) / (denominator + half_step) - ratio_half_step
    highest = (numerator + half_step) / max(denominator - half_step, 1e-12) + ratio_half_step
    return lowest <= ratio <= highest


def test_bench_prompt_cache_table_and_plot(bf16_checkpoint, tmp_path, capsys):
    plot = tmp_path / "ttft.png"
    assert (
        cli.main(
            [
                "bench",
                "prompt-cache",
                "--model",
                str(bf16_checkpoint),
                "--history",
                "64",
                "160",
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 2
    for history, cached, cold, warm, ratio in rows:
        assert 0 < int(cached) < int(history)  # the document came from the cache
        # seconds are printed to 1 ms, the ratio to 0.1
        assert ratio_agrees(float(ratio.rstrip("x")), 0.05, float(cold), float(warm), 0.0005)
    with Image.open(plot) as image:
        assert image.size == (640, 400)


def test_bench_prompt_cache_refuses_tiny_histories(bf16_checkpoint, capsys):
    assert (
        cli.main(["bench", "prompt-cache", "--model", str(bf16_checkpoint), "--history", "-5"]) == 2
    )
    assert "--history lengths must be at least 16 tokens, got -5" in capsys.readouterr().err


def test_bench_speculative_costs_expectations_and_end_to_end(make_checkpoint, tmp_path, capsys):
    """On a tiny checkpoint with a random head, trained first: every table's ratios agree with
    its times, the expected speed-ups with the measured costs, and speculation ran to the
    plain tokens (the command fails otherwise)."""
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    add_mtp_head(directory, mtp_tensors())
    args = ["bench", "speculative", "--model", str(directory), "--context", "32"]
    args += ["--max-k", "2", "--tokens", "24", "--repeats", "1", "--train-mtp", "30"]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    plain_ms = float(
        next(line for line in lines if line.startswith("plain decode step")).split()[3]
    )
    draft_ms = float(next(line for line in lines if line.startswith("MTP draft step")).split()[3])
    costs = {}
    for line in lines:
        cells = line.split()
        if len(cells) == 5 and cells[0] in ("1", "2") and cells[2].endswith("x"):
            k, steps_ms, steps_ratio, refeed_ms, refeed_ratio = cells
            costs[int(k)] = float(steps_ms)
            for ms, ratio in ((steps_ms, steps_ratio), (refeed_ms, refeed_ratio)):
                assert ratio_agrees(float(ratio[:-1]), 0.005, float(ms), plain_ms, 0.005)
    assert set(costs) == {1, 2}
    expected_rows = [
        line.split() for line in lines if re.match(r"^[12]  +\d", line) and "x" in line
    ][2:]  # after the cost rows: the expected speed-ups at a = 0.5 .. 0.9
    for cells in expected_rows:
        k = int(cells[0])
        for rate, cell in zip((0.5, 0.6, 0.7, 0.8, 0.9), cells[1:], strict=True):
            tokens = sum(rate**i for i in range(k + 1))
            expected = tokens * plain_ms / (costs[k] + k * draft_ms)
            assert float(cell[:-1]) == pytest.approx(expected, rel=0.02, abs=0.01)
    assert len(expected_rows) == 2
    assert "trained MTP head: top-1" in "\n".join(lines)
    row = re.compile(r"^(plain|MTP adaptive k|MTP k=2) +[\d.]+ +([\d.]+x)")
    decoding = [found.groups() for found in map(row.match, lines) if found]
    assert [name for name, _ in decoding] == ["plain", "MTP adaptive k", "MTP k=2"]
    assert decoding[0][1] == "1.00x"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-k", "0"], "--max-k must be from 1 to 16, got 0"),
        (["--repeats", "0"], "--repeats must be a whole number >= 1, got 0"),
        (["--context", "0"], "--context must be a whole number >= 1, got 0"),
        (["--tokens", "0"], "--tokens must be a whole number >= 1, got 0"),
        (["--train-mtp", "-3"], "--train-mtp must be a whole number >= 1, got -3"),
    ],
)
def test_bench_speculative_refuses_careless_flags_before_loading(flags, message, capsys):
    args = ["bench", "speculative", "--model", "/nonexistent/checkpoint", *flags]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("through", [[], ["--http"]], ids=["library", "http"])
def test_bench_batch_ratios_and_same_tokens(bf16_checkpoint, capsys, through):
    argv = ["bench", "batch", "--model", str(bf16_checkpoint), "--clients", "1", "3", *through]
    assert cli.main([*argv, "--tokens", "3", "--prompt-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "3"]
    for _, alone, together, ratio, same in rows:
        assert same == "yes"
        assert abs(float(ratio.rstrip("x")) - float(together) / float(alone)) < 0.02 + 0.01 * float(
            ratio.rstrip("x")
        )


def test_bench_batch_refuses_bad_client_counts(bf16_checkpoint, capsys):
    argv = ["bench", "batch", "--model", str(bf16_checkpoint), "--clients", "2", "0"]
    assert cli.main(argv) == 2
    assert "--clients must be a whole number >= 1, got 0" in capsys.readouterr().err
