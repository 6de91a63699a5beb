"""Generation speed of your setup: load time, prefill and decode tokens/s, peak memory.

The same random token-id prompt is generated greedily by each library given, one after the other
in this process, each after a warm-up run; `qwen35-mlx bench generate` times qwen35_mlx alone,
`python -m benchmarks.generate` races it against mlx-lm.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..generate import stream_generate
from ..loading import load
from .report import print_rows, progress
from .tokenizer_files import SPECIAL_TOKENS


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length")
    parser.add_argument("--generation-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--repeats", type=int, default=1, help="measured runs (median)")
    parser.add_argument(
        "--prefill-step-size", type=int, default=2048, help="prompt tokens per forward pass"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")


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
    return Run(
        prefill_tps=prompt_tokens / (first - start),
        decode_tps=(len(tokens) - 1) / decode_s if decode_s > 0 else float("nan"),
        peak_gb=mx.get_peak_memory() / 1e9,
        tokens=tokens,
        finish=finish,
    )


def _ours(path: str):
    model, tokenizer = load(path)

    def stream(ids: list[int], max_tokens: int, prefill_step_size: int):
        return stream_generate(
            model, tokenizer, ids, max_tokens=max_tokens, prefill_step_size=prefill_step_size
        )

    return stream


# name -> load(path) -> stream(ids, max_tokens, prefill_step_size): what a benchmark races
Library = Callable[[str], Callable]
LIBRARIES: dict[str, Library] = {"qwen35_mlx": _ours}


def measure(
    name: str,
    load_library: Library,
    path: str,
    warmup: list[int],
    prompts: list[list[int]],
    args: argparse.Namespace,
) -> Result:
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    start = time.perf_counter()
    stream = load_library(path)
    load_s = time.perf_counter() - start
    weights_gb = (mx.get_active_memory() - before) / 1e9
    progress(f"{name}: loaded in {load_s:.1f} s; warm-up run")
    timed(stream(warmup, args.generation_tokens, args.prefill_step_size), len(warmup))
    runs = []
    for n, ids in enumerate(prompts, start=1):
        progress(f"{name}: run {n} of {len(prompts)}")
        runs.append(timed(stream(ids, args.generation_tokens, args.prefill_step_size), len(ids)))
        progress(
            f"{name}: run {n}: prefill {runs[-1].prefill_tps:.2f} tok/s, decode "
            f"{runs[-1].decode_tps:.2f} tok/s, peak {runs[-1].peak_gb:.3f} GB"
        )
    del stream  # free the weights before the other library loads its own
    gc.collect()
    mx.clear_cache()
    return Result(name, load_s, weights_gb, runs)


def bench_generate(args: argparse.Namespace, libraries: dict[str, Library] = LIBRARIES) -> int:
    """Time `libraries` one after the other on the same prompts; print a table."""
    for flag in ("prompt_tokens", "generation_tokens", "repeats", "prefill_step_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    config_file = Path(args.model) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found; --model must be a checkpoint folder "
            "(write one with `qwen35-mlx bench make-checkpoint`)"
        )
    config = json.loads(config_file.read_text())
    text = config.get("text_config", config)
    # Prompt ids below the special tokens: no chat markup, no stop token in the prompt.
    high = min(text["vocab_size"], min(SPECIAL_TOKENS))
    rng = np.random.default_rng(args.seed)
    warmup, *prompts = (
        rng.integers(0, high, size=args.prompt_tokens).tolist() for _ in range(args.repeats + 1)
    )
    results = [
        measure(name, load_library, args.model, warmup, prompts, args)
        for name, load_library in libraries.items()
    ]
    print(
        f"model {args.model}: hidden {text['hidden_size']}, {text['num_hidden_layers']} "
        f"layers, {text.get('dtype', '?')}; prompt {args.prompt_tokens} tokens, generate "
        f"{args.generation_tokens} (greedy), prefill step {args.prefill_step_size}, "
        f"{args.repeats} measured run(s) after 1 warm-up each; MLX {mx.__version__} on "
        f"{mx.default_device()}"
    )
    print_table(results, args.generation_tokens)
    return check_lengths(results, args.generation_tokens)


def print_table(results: list[Result], wanted: int) -> None:
    columns = (
        "library",
        "load s",
        "weights GB",
        "prefill tok/s",
        "decode tok/s",
        "peak GB",
        "tokens",
    )
    rows = [
        [
            r.name,
            f"{r.load_s:.2f}",
            f"{r.weights_gb:.3f}",
            f"{r.median('prefill_tps'):.2f}",
            f"{r.median('decode_tps'):.2f}",
            f"{r.median('peak_gb'):.3f}",
            "/".join(f"{len(run.tokens)}" for run in r.runs) + f" of {wanted}",
        ]
        for r in results
    ]
    ours, *peers = results
    for peer in peers:
        rows.append(
            [f"ours/{peer.name}"]
            + [
                f"{a / b:.2f}x" if b else "-"
                for a, b in (
                    (ours.load_s, peer.load_s),
                    (ours.weights_gb, peer.weights_gb),
                    (ours.median("prefill_tps"), peer.median("prefill_tps")),
                    (ours.median("decode_tps"), peer.median("decode_tps")),
                    (ours.median("peak_gb"), peer.median("peak_gb")),
                )
            ]
            + [""]
        )
    print_rows(columns, rows)
    if peers:
        print(
            "(ratios: tok/s above 1x = qwen35_mlx faster; load s, GB below 1x = qwen35_mlx "
            "quicker/smaller)"
        )
    if len(ours.runs) > 1:
        for r in results:
            print(
                f"{r.name} runs: prefill "
                + ", ".join(f"{x.prefill_tps:.2f}" for x in r.runs)
                + " | decode "
                + ", ".join(f"{x.decode_tps:.2f}" for x in r.runs)
            )
    for peer in peers:
        for a, b in zip(ours.runs, peer.runs):
            same = next(
                (i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y),
                min(len(a.tokens), len(b.tokens)),
            )
            print(
                f"greedy tokens identical to {peer.name}'s for the first {same} of "
                f"{len(a.tokens)}/{len(b.tokens)}"
            )


def check_lengths(results: list[Result], wanted: int) -> int:
    """1 when a run stopped early (a random model emitted a stop token): the rates then
    compare different amounts of work."""
    short = [
        (r.name, len(run.tokens), run.finish)
        for r in results
        for run in r.runs
        if len(run.tokens) != wanted
    ]
    for name, count, finish in short:
        print(
            f"qwen35-mlx bench: {name} produced {count} of {wanted} tokens (finish: "
            f"{finish}); decode rates are not comparable, try another --seed",
            file=sys.stderr,
        )
    return 1 if short else 0
