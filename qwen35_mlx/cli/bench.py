"""Time your setup: generation speed, start-up, warm turns, prefill memory, speculative
decoding and continuous batching of a checkpoint, and random-weight checkpoints with the real
shapes of each size to time it on."""

from __future__ import annotations

import argparse
import time

from ..bench import batch as batch_bench
from ..bench import constrained as constrained_bench
from ..bench import generate as generate_bench
from ..bench import kernel_counters, model_primitives, prefill_memory
from ..bench import speculative as speculative_bench
from ..bench.prompt_cache import bench_prompt_cache
from ..bench.random_checkpoint import DTYPES, SIZES, write_random_checkpoint
from ..bench.startup import bench_startup


def add_args(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="bench_command", required=True)
    run = commands.add_parser(
        "generate",
        help="load time, prefill/decode tokens/s and peak memory of a checkpoint",
        description="Greedy generation from a random token-id prompt after a warm-up run: load "
        "time, prefill and decode tokens/s, peak memory. (The race against mlx-lm "
        "is `python -m benchmarks.generate` in the repository.)",
    )
    generate_bench.add_args(run)
    warm = commands.add_parser(
        "prompt-cache",
        help="warm-turn time to first token, prefix cache vs reprocessing",
        description="For each history length, the next turn's time to first token with the "
        "prefix cache (after the first turn filled it) and without it (the whole "
        "history prefilled, as mlx-lm does for a hybrid model), in one run.",
    )
    warm.add_argument("--model", required=True, help="checkpoint directory")
    warm.add_argument(
        "--history",
        type=int,
        nargs="+",
        default=[2048, 8192],
        help="history lengths in tokens (the issue's set adds 32768)",
    )
    warm.add_argument("--plot", metavar="FILE", help="also draw the curves into this PNG")
    serve = commands.add_parser(
        "serve",
        help="the server's warm-request time to first token, prefix cache vs none",
        description="A real server on loopback; for each history length, the time to first "
        "token of a request resending the history, with the engine's prefix cache and "
        "without, in one run (needs the server extra).",
    )
    serve.add_argument("--model", required=True, help="checkpoint directory")
    serve.add_argument(
        "--history", type=int, nargs="+", default=[1024, 4096], help="history lengths in tokens"
    )
    memory = commands.add_parser(
        "prefill-memory",
        help="peak memory of prefill by prompt length, per attention path",
        description="Prefills random prompts of each length, blocked attention and the plain "
        "fast path in one run: peak, weights, KV cache, the rest and its ratio vs "
        "the first length; then the KV cache's bytes per token at 16, 8, 4 bits.",
    )
    prefill_memory.add_args(memory)
    speculative = commands.add_parser(
        "speculative",
        help="when speculative decoding pays: verify and draft costs, expected and "
        "measured speed-up",
        description="After a random prompt: a plain decode step, a verify pass of k+1 tokens "
        "(each rollback) and an MTP draft step; the expected speed-up for acceptance "
        "0.5-0.9 from them; then greedy decoding plain vs MTP speculation end to end.",
    )
    speculative_bench.add_args(speculative)
    batch = commands.add_parser(
        "batch",
        help="aggregate tokens/s of concurrent requests, batched vs one at a time",
        description="For each client count N: N greedy requests with prompts of different "
        "lengths served one at a time (stream_generate) and batched (BatchGenerator) in one "
        "run: aggregate tokens/s of each, their ratio, and whether the tokens agree; with "
        "--http, as concurrent clients of a real server on loopback.",
    )
    batch_bench.add_args(batch)
    constrained = commands.add_parser(
        "constrained",
        help="constrained decoding's cost per token vs unconstrained decoding",
        description="Decodes one JSON reply with the grammar's mask computed and applied at "
        "each step and without it, in one run: ms per token and the ratio, with the "
        "time to prepare the tokenizer and compile the schema.",
    )
    constrained_bench.add_args(constrained)
    kernels = commands.add_parser(
        "kernels",
        help="per-launch counters of the Metal kernels, from the MSL emulator; primitives "
        "per decoded token of the whole model against mlx-lm's",
        description="Runs the fused decode step and the chunked scan at each size's DeltaNet "
        "heads in the MSL-on-CPU emulator and prints what each launch asks of the GPU: "
        "device bytes read and written (against one read and write of the state), "
        "threadgroup-memory bank conflicts per SIMD step and by kernel line, barriers "
        "per threadgroup and per chunk, threadgroup memory, threads. Needs the "
        "repository's tests/msl_emulator beside the package and g++; without the emulator "
        "it says so and exits 0. Then counts the MLX primitives and custom-kernel dispatches "
        "one decoded token costs the whole text model of each size (bf16 and 4-bit weights), "
        "ours on the CPU and the Metal path against mlx-lm's plain and Metal branches, from "
        "graphs traced with mx.export_function (mlx-lm rows need `pip install "
        "'qwen35-mlx[bench]'`).",
    )
    kernels.add_argument(
        "--heads",
        nargs="+",
        choices=("0.8B", "9B"),
        default=["0.8B", "9B"],
        help="sizes: whose DeltaNet heads the kernels run (0.8B: Hk = Hv = 16, 9B: Hk = 16, "
        "Hv = 32) and whose whole model the primitives are counted for",
    )
    kernels.add_argument("--tokens", type=int, default=64, help="T of the chunked scan")
    kernels.add_argument("--batch", type=int, default=1, help="B of both kernels")
    startup = commands.add_parser(
        "startup",
        help="how much `import qwen35_mlx` adds to `import mlx.core`",
        description="Times `import mlx.core` and `import qwen35_mlx` in fresh processes "
        "(alternating; median), and names any heavy library (transformers, torch, "
        "mlx-lm) the import pulls in; exits 1 if one is.",
    )
    startup.add_argument("--repeats", type=int, default=7, help="processes per import")
    make = commands.add_parser(
        "make-checkpoint",
        help="write a random-weight checkpoint in the released layout",
        description="Random weights with the real shapes of a Qwen3.5 size, Hugging Face "
        "layout, the released tokenizer format and chat template: a stand-in to "
        "try and time everything without downloading real weights.",
    )
    make.add_argument("--size", choices=sorted(SIZES), default="0.8B", help="model size")
    make.add_argument("--out", required=True, help="new (or empty) output folder")
    make.add_argument("--num-layers", type=int, help="decoder layers (a multiple of 4)")
    make.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    make.add_argument(
        "--no-vision", dest="vision", action="store_false", help="leave out the vision tower"
    )
    make.add_argument(
        "--no-mtp", dest="mtp", action="store_false", help="leave out the MTP head (mtp.*)"
    )


def main(args: argparse.Namespace) -> int:
    if args.bench_command == "make-checkpoint":
        start = time.perf_counter()
        out = write_random_checkpoint(
            args.out,
            size=args.size,
            num_layers=args.num_layers,
            dtype=args.dtype,
            seed=args.seed,
            vision=args.vision,
            mtp=args.mtp,
        )
        size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
        print(f"wrote {out} ({size:.2f} GB) in {time.perf_counter() - start:.1f} s")
        return 0
    if args.bench_command == "prompt-cache":
        bench_prompt_cache(args.model, args.history, args.plot)
        return 0
    if args.bench_command == "serve":
        from ..bench import serve as serve_bench  # needs the server extra

        serve_bench.bench_serve(args.model, args.history)
        return 0
    if args.bench_command == "prefill-memory":
        return prefill_memory.bench_prefill_memory(args)
    if args.bench_command == "speculative":
        return speculative_bench.bench_speculative(args)
    if args.bench_command == "batch":
        return batch_bench.bench_batch(args)
    if args.bench_command == "constrained":
        return constrained_bench.bench_constrained(args)
    if args.bench_command == "kernels":
        code = kernel_counters.bench_kernel_counters(args.heads, args.tokens, args.batch)
        model_primitives.bench_decode_primitives(args.heads)
        return code
    if args.bench_command == "startup":
        return bench_startup(args.repeats)
    return generate_bench.bench_generate(args)
