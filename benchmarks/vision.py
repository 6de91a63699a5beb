"""Vision-tower time and memory: qwen35_mlx against mlx-vlm's qwen3_5 tower on the same
checkpoint, one after the other in the same process, with the same random pixels."""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen35_mlx.bench.random_checkpoint import DTYPES, write_random_checkpoint
from qwen35_mlx.bench.report import print_rows, progress
from qwen35_mlx.loading import load_model, read_config


@dataclass
class Measurement:
    name: str
    seconds: list[float]  # one per measured run
    work_gb: float  # peak memory above what was allocated before the runs (the weights)
    features: np.ndarray  # float32, to check that both computed the same thing

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _ours(directory: Path) -> tuple[Callable, object]:
    model = load_model(directory)
    return model.encode_vision, model


def _mlx_vlm(directory: Path) -> tuple[Callable, object]:
    import mlx_vlm.utils  # imported here: only this bench needs mlx-vlm

    model = mlx_vlm.utils.load_model(directory)
    dtype = model.vision_tower.patch_embed.proj.weight.dtype

    def encode(pixels: mx.array, grid: list) -> mx.array:
        # mlx-vlm casts the pixels to the tower's dtype before calling it; so do we, untimed
        return model.vision_tower(pixels.astype(dtype), mx.array(grid))[0]

    return encode, model


TOWERS = {"qwen35_mlx": _ours, "mlx-vlm": _mlx_vlm}


def measure(name: str, directory: Path, pixels: mx.array, grid: list, repeats: int) -> Measurement:
    gc.collect()
    mx.clear_cache()
    encode, model = TOWERS[name](directory)
    progress(f"{name}: loaded; warm-up run")
    mx.eval(encode(pixels, grid))
    seconds, work = [], 0.0
    for n in range(1, repeats + 1):
        mx.synchronize()
        gc.collect()
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        features = encode(pixels, grid)
        mx.eval(features)
        seconds.append(time.perf_counter() - start)
        work = max(work, (mx.get_peak_memory() - before) / 1e9)
        progress(f"{name}: run {n} of {repeats}: {seconds[-1]:.3f} s")
    result = Measurement(name, seconds, work, np.array(features.astype(mx.float32)))
    del encode, model, features
    gc.collect()
    mx.clear_cache()
    return result


def bench_vision(
    model: str | None, image_size: int, repeats: int, dtype: str, seed: int
) -> tuple[list[Measurement], str]:
    """Returns (ours, mlx-vlm's) measurements and a line describing the setup."""
    if image_size < 32 or image_size % 32:
        raise ValueError(
            f"--image-size {image_size} must be a positive multiple of 32 (the "
            "processor's resize factor: 16-px patches merged 2x2)"
        )
    if repeats < 1:
        raise ValueError("--repeats must be at least 1")
    side = image_size // 16
    grid = [[1, side, side]]
    with tempfile.TemporaryDirectory(prefix="qwen35-vision-bench-") as scratch:
        directory = Path(model) if model else None
        if directory is None:
            progress(f"writing a random 0.8B checkpoint ({dtype}, 4 decoder layers)")
            directory = write_random_checkpoint(
                Path(scratch) / "ckpt", size="0.8B", num_layers=4, dtype=dtype, seed=seed, mtp=False
            )
        vision = read_config(directory).vision
        if vision is None:
            raise ValueError(
                f"{directory} has no vision_config; write a checkpoint with a "
                "vision tower (`qwen35-mlx bench make-checkpoint`) or leave out "
                "--model"
            )
        rng = np.random.default_rng(seed)
        pixels = rng.uniform(-1, 1, size=(side * side, vision.patch_dim)).astype(np.float32)
        pixels = mx.array(pixels)  # [patches, C*Tp*P*P], normalized to [-1, 1] as processed
        results = [measure(name, directory, pixels, grid, repeats) for name in TOWERS]
    setup = (
        f"vision tower of {model or 'a random 0.8B checkpoint (' + dtype + ')'}: one "
        f"{image_size}x{image_size} image, grid (1, {side}, {side}) = {side * side} patches "
        f"-> {side * side // 4} tokens; best and median of {repeats} run(s) after 1 "
        f"warm-up each; MLX {mx.__version__} on {mx.default_device()}"
    )
    return results, setup


def print_table(results: list[Measurement], setup: str) -> None:
    ours, theirs = results
    columns = ("tower", "best s", "median s", "work GB")
    rows = [[r.name, f"{r.best:.4g}", f"{r.median:.4g}", f"{r.work_gb:.4g}"] for r in results]
    rows.append(
        ["ours/mlx-vlm"]
        + [
            f"{a / b:.3f}x" if b else "-"
            for a, b in (
                (ours.best, theirs.best),
                (ours.median, theirs.median),
                (ours.work_gb, theirs.work_gb),
            )
        ]
    )
    print(setup)
    print_rows(columns, rows)
    print(
        "(ratios below 1x = qwen35_mlx faster / smaller; work GB: peak memory of one run "
        "above the loaded weights)"
    )
    error = np.linalg.norm(ours.features - theirs.features) / np.linalg.norm(theirs.features)
    print(f"features: relative error ours vs mlx-vlm {error:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vision",
        description="Encodes the same random image patches with qwen35_mlx's vision tower and "
        "mlx-vlm's qwen3_5 one, loaded from the same checkpoint, one after the other "
        "in this process, each after a warm-up run.",
    )
    parser.add_argument(
        "--model",
        help="checkpoint folder both libraries load (default: a "
        "random 0.8B checkpoint written to a temporary folder)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=1024,
        help="side of the square image in pixels (a multiple of 32)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per library")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="weight dtype of the random checkpoint (without --model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and pixels")
    args = parser.parse_args(argv)
    print_table(*bench_vision(args.model, args.image_size, args.repeats, args.dtype, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
