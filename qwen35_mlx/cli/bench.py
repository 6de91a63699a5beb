"""Benchmarks against mlx-lm (generation speed and memory, conversion), and random-weight
checkpoints to run them on."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import numpy as np

from ..bench import convert as convert_bench
from ..bench import kernels as kernels_bench
from ..bench import vision as vision_bench
from ..bench.random_checkpoint import DTYPES, SIZES, SPECIAL_TOKENS, write_random_checkpoint
from ..bench.report import print_rows, progress
from ..generate import stream_generate
from ..loading import load


def add_args(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="bench_command", required=True)
    run = commands.add_parser(
        "generate", help="prefill/decode tokens/s and peak memory, qwen35_mlx vs mlx-lm",
        description="Greedy generation from the same random token-id prompt with qwen35_mlx "
                    "(load + stream_generate) and mlx-lm (mlx_lm.load + stream_generate), one "
                    "after the other in this process, each after a warm-up run.")
    run.add_argument("--model", required=True, help="checkpoint directory both libraries load")
    run.add_argument("--prompt-tokens", type=int, default=512, help="prompt length")
    run.add_argument("--generation-tokens", type=int, default=64, help="tokens to generate")
    run.add_argument("--repeats", type=int, default=1, help="measured runs per library (median)")
    run.add_argument("--prefill-step-size", type=int, default=2048,
                     help="prompt tokens per forward pass, for both libraries")
    run.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    make = commands.add_parser(
        "make-checkpoint", help="write a random-weight checkpoint in the released layout",
        description="Random weights with the real shapes of a Qwen3.5 size, Hugging Face "
                    "layout, and a byte-level tokenizer with the released special tokens and "
                    "chat template: a stand-in for benchmarks and offline trials.")
    make.add_argument("--size", choices=sorted(SIZES), default="0.8B", help="model size")
    make.add_argument("--out", required=True, help="new (or empty) output folder")
    make.add_argument("--num-layers", type=int, help="decoder layers (a multiple of 4)")
    make.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    make.add_argument("--no-vision", dest="vision", action="store_false",
                      help="leave out the vision tower")
    make.add_argument("--no-mtp", dest="mtp", action="store_false",
                      help="leave out the MTP head (mtp.*)")
    conv = commands.add_parser(
        "convert", help="conversion time, memory, size and logit error, qwen35_mlx vs mlx-lm",
        description="Converts one checkpoint with qwen35_mlx.convert (hybrid and uniform "
                    "recipes) and mlx_lm.convert at each bit width, plus a bfloat16 float "
                    "conversion by each, every conversion in its own process; then compares "
                    "each output's logits with the source's.")
    conv.add_argument("--hf-path", required=True, help="local Hugging Face checkpoint folder")
    conv.add_argument("--bits", type=int, nargs="+", choices=(4, 6, 8), default=[4, 6, 8],
                      help="bit widths to quantize at")
    conv.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64,
                      help="quantization group size")
    conv.add_argument("--out-dir", help="keep the outputs in this new folder (default: a "
                                        "temporary folder, deleted at the end)")
    vision = commands.add_parser(
        "vision", help="vision-tower time and memory for one image, qwen35_mlx vs mlx-vlm",
        description="Encodes the same random image patches with qwen35_mlx's vision tower and "
                    "mlx-vlm's qwen3_5 one, loaded from the same checkpoint, one after the other "
                    "in this process, each after a warm-up run.")
    vision.add_argument("--model", help="checkpoint folder both libraries load (default: a "
                                        "random 0.8B checkpoint written to a temporary folder)")
    vision.add_argument("--image-size", type=int, default=1024,
                        help="side of the square image in pixels (a multiple of 32)")
    vision.add_argument("--repeats", type=int, default=3, help="measured runs per library")
    vision.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="weight dtype of the random checkpoint (without --model)")
    vision.add_argument("--seed", type=int, default=0, help="seed of the weights and pixels")
    kern = commands.add_parser(
        "kernels", help="Gated DeltaNet scan time and primitives per token, ours vs MLX and mlx-lm",
        description="Times one DeltaNet layer's scan (bf16 inputs, B = 1) with each of our "
                    "paths that runs on this device, mx.fast.gated_delta_update and mlx-lm's "
                    "gated_delta_update, in one run, as ratios against the faster of the two "
                    "peers; then counts the MLX primitives one decoded token costs a DeltaNet "
                    "layer on each decode path, ours against mlx-lm's, from the graph traced "
                    "with mx.export_function.")
    kern.add_argument("--tokens", type=int, nargs="+", default=list(kernels_bench.DEFAULT_TOKENS),
                      help="sequence lengths T (default: 64 512 2048; the issue's set adds 8192, "
                           "heavy on a CPU: the per-token paths keep ~1.1 MB per token alive, "
                           "9 GB with the 0.8B heads and twice that with the 9B ones)")
    kern.add_argument("--heads", nargs="+", choices=kernels_bench.SIZES,
                      default=list(kernels_bench.SIZES),
                      help="whose DeltaNet heads: 0.8B (Hk = Hv = 16), 9B (Hk = 16, Hv = 32)")
    kern.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (best)")


def main(args: argparse.Namespace) -> int:
    if args.bench_command == "make-checkpoint":
        start = time.perf_counter()
        out = write_random_checkpoint(args.out, size=args.size, num_layers=args.num_layers,
                                      dtype=args.dtype, seed=args.seed, vision=args.vision,
                                      mtp=args.mtp)
        size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
        print(f"wrote {out} ({size:.2f} GB) in {time.perf_counter() - start:.1f} s")
        return 0
    if args.bench_command == "convert":
        outcomes, baseline = convert_bench.bench_convert(args.hf_path, args.bits,
                                                         args.group_size, args.out_dir)
        convert_bench.print_table(outcomes, baseline, args.hf_path, args.group_size)
        return convert_bench.failed(outcomes)
    if args.bench_command == "kernels":
        kernels_bench.bench_kernels(args.heads, args.tokens, args.repeats)
        return 0
    if args.bench_command == "vision":
        vision_bench.print_table(*vision_bench.bench_vision(
            args.model, args.image_size, args.repeats, args.dtype, args.seed))
        return 0
    return bench_generate(args)


@dataclass
class Run:
    prefill_tps: float
    decode_tps: float
    peak_gb: float
    tokens: list[int]
    finish: str | None


@dataclass
class Result:
    name: str
    load_s: float
    weights_gb: float
    runs: list[Run]

    def median(self, field: str) -> float:
        return statistics.median(getattr(run, field) for run in self.runs)


def timed(responses: Iterable, prompt_tokens: int) -> Run:
    """Time a response stream from outside, the same way for both libraries: prefill = until
    the first token, decode = (tokens - 1) / time from the first token to the last."""
    mx.synchronize()  # mlx-lm leaves one more step queued when its stream ends
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = last = None
    tokens, finish = [], None
    for response in responses:
        last = time.perf_counter()
        first = first or last
        tokens.append(int(response.token))
        finish = response.finish_reason
    if first is None:
        raise ValueError("no token was generated; ask for --generation-tokens >= 1")
    decode_s = last - first
    return Run(prefill_tps=prompt_tokens / (first - start),
               decode_tps=(len(tokens) - 1) / decode_s if decode_s > 0 else float("nan"),
               peak_gb=mx.get_peak_memory() / 1e9, tokens=tokens, finish=finish)


def _ours(path: str):
    model, tokenizer = load(path)

    def stream(ids: list[int], max_tokens: int, prefill_step_size: int):
        return stream_generate(model, tokenizer, ids, max_tokens=max_tokens,
                               prefill_step_size=prefill_step_size)

    return stream


def _mlx_lm(path: str):
    import mlx_lm  # imported here: it pulls in transformers, which other commands do not need

    model, tokenizer = mlx_lm.load(path)

    def stream(ids: list[int], max_tokens: int, prefill_step_size: int):
        # no sampler: mlx-lm decodes greedily (argmax), as stream_generate with temp 0 does
        return mlx_lm.stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_tokens,
                                      prefill_step_size=prefill_step_size)

    return stream


LIBRARIES: dict[str, Callable] = {"qwen35_mlx": _ours, "mlx-lm": _mlx_lm}


def measure(name: str, path: str, warmup: list[int], prompts: list[list[int]],
            args: argparse.Namespace) -> Result:
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    start = time.perf_counter()
    stream = LIBRARIES[name](path)
    load_s = time.perf_counter() - start
    weights_gb = (mx.get_active_memory() - before) / 1e9
    progress(f"{name}: loaded in {load_s:.1f} s; warm-up run")
    timed(stream(warmup, args.generation_tokens, args.prefill_step_size), len(warmup))
    runs = []
    for n, ids in enumerate(prompts, start=1):
        progress(f"{name}: run {n} of {len(prompts)}")
        runs.append(timed(stream(ids, args.generation_tokens, args.prefill_step_size), len(ids)))
        progress(f"{name}: run {n}: prefill {runs[-1].prefill_tps:.2f} tok/s, decode "
                 f"{runs[-1].decode_tps:.2f} tok/s, peak {runs[-1].peak_gb:.3f} GB")
    del stream  # free the weights before the other library loads its own
    gc.collect()
    mx.clear_cache()
    return Result(name, load_s, weights_gb, runs)


def bench_generate(args: argparse.Namespace) -> int:
    for flag in ("prompt_tokens", "generation_tokens", "repeats", "prefill_step_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    config_file = Path(args.model) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; --model must be a checkpoint folder "
                                "(write one with `qwen35-mlx bench make-checkpoint`)")
    config = json.loads(config_file.read_text())
    text = config.get("text_config", config)
    # Prompt ids below the special tokens: no chat markup, no stop token in the prompt.
    high = min(text["vocab_size"], min(SPECIAL_TOKENS))
    rng = np.random.default_rng(args.seed)
    warmup, *prompts = (rng.integers(0, high, size=args.prompt_tokens).tolist()
                        for _ in range(args.repeats + 1))
    results = [measure(name, args.model, warmup, prompts, args) for name in LIBRARIES]
    print(f"model {args.model}: hidden {text['hidden_size']}, {text['num_hidden_layers']} "
          f"layers, {text.get('dtype', '?')}; prompt {args.prompt_tokens} tokens, generate "
          f"{args.generation_tokens} (greedy), prefill step {args.prefill_step_size}, "
          f"{args.repeats} measured run(s) after 1 warm-up each; MLX {mx.__version__} on "
          f"{mx.default_device()}")
    print_table(results, args.generation_tokens)
    return check_lengths(results, args.generation_tokens)


def print_table(results: list[Result], wanted: int) -> None:
    columns = ("library", "load s", "weights GB", "prefill tok/s", "decode tok/s", "peak GB",
               "tokens")
    rows = [[r.name, f"{r.load_s:.2f}", f"{r.weights_gb:.3f}", f"{r.median('prefill_tps'):.2f}",
             f"{r.median('decode_tps'):.2f}", f"{r.median('peak_gb'):.3f}",
             "/".join(f"{len(run.tokens)}" for run in r.runs) + f" of {wanted}"]
            for r in results]
    ours, theirs = results
    rows.append(["ours/mlx-lm"] + [
        f"{a / b:.2f}x" if b else "-" for a, b in (
            (ours.load_s, theirs.load_s), (ours.weights_gb, theirs.weights_gb),
            (ours.median("prefill_tps"), theirs.median("prefill_tps")),
            (ours.median("decode_tps"), theirs.median("decode_tps")),
            (ours.median("peak_gb"), theirs.median("peak_gb")))] + [""])
    print_rows(columns, rows)
    print("(ratios: tok/s above 1x = qwen35_mlx faster; load s, GB below 1x = qwen35_mlx "
          "quicker/smaller)")
    if len(ours.runs) > 1:
        for r in results:
            print(f"{r.name} runs: prefill " + ", ".join(f"{x.prefill_tps:.2f}" for x in r.runs)
                  + " | decode " + ", ".join(f"{x.decode_tps:.2f}" for x in r.runs))
    for a, b in zip(ours.runs, theirs.runs):
        same = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y),
                    min(len(a.tokens), len(b.tokens)))
        print(f"greedy tokens identical for the first {same} of {len(a.tokens)}/{len(b.tokens)}")


def check_lengths(results: list[Result], wanted: int) -> int:
    """1 when a run stopped early (a random model emitted a stop token): the rates then
    compare different amounts of work."""
    short = [(r.name, len(run.tokens), run.finish) for r in results for run in r.runs
             if len(run.tokens) != wanted]
    for name, count, finish in short:
        print(f"qwen35-mlx bench: {name} produced {count} of {wanted} tokens (finish: "
              f"{finish}); decode rates are not comparable, try another --seed", file=sys.stderr)
    return 1 if short else 0
