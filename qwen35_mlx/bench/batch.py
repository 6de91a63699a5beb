"""Continuous batching against serving requests one at a time, measured in one run.

For each client count N: N greedy requests (random token-id prompts of different lengths, so
the rows sit at different offsets) served one after another by `stream_generate`, then all
together by a `BatchGenerator` of N slots; aggregate generated tokens per second of each
(prefill included, as a client sees it), their ratio, and whether every request got the same
tokens both ways.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..batch import BatchGenerator
from ..generate import check_whole, stream_generate
from ..loading import load
from .report import print_rows, progress


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent requests"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=32,
        help="the shortest prompt; request i's is (1 + i/4) times as long",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weight dtype (default: the checkpoint's; the CPU backend has BLAS for float32 "
        "only, where a batch's matmuls cost less per row than one row's)",
    )


def check_args(args: argparse.Namespace) -> None:
    check_whole("--tokens", args.tokens, 1)
    check_whole("--prompt-tokens", args.prompt_tokens, 1)
    for clients in args.clients:
        check_whole("--clients", clients, 1)


def one_at_a_time(model, tokenizer, prompts, max_tokens: int) -> list[list[int]]:
    return [
        [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]
        for prompt in prompts
    ]


def batched(model, tokenizer, prompts, max_tokens: int) -> list[list[int]]:
    generator = BatchGenerator(model, tokenizer, max_batch=len(prompts))
    uids = [generator.insert(prompt, max_tokens=max_tokens) for prompt in prompts]
    tokens = {uid: [] for uid in uids}
    while len(generator):
        for uid, response in generator.step():
            tokens[uid].append(response.token)
    return [tokens[uid] for uid in uids]


def timed(run, *args) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = run(*args)
    return time.perf_counter() - start, out


def bench_batch(args: argparse.Namespace) -> int:
    check_args(args)
    model, tokenizer = load(args.model, dtype=args.dtype)
    rng = np.random.default_rng(args.seed)
    vocab = model.config.text.vocab_size
    lengths = [args.prompt_tokens * (4 + i) // 4 for i in range(max(args.clients))]
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in lengths]
    batched(model, tokenizer, prompts[:2], 4)  # warm-up: compile, allocate
    rows = []
    for clients in args.clients:
        progress(f"{clients} client(s), {args.tokens} tokens each")
        alone_s, alone = timed(one_at_a_time, model, tokenizer, prompts[:clients], args.tokens)
        together_s, together = timed(batched, model, tokenizer, prompts[:clients], args.tokens)
        generated = sum(len(tokens) for tokens in alone)
        rows.append(
            (
                clients,
                f"{generated / alone_s:.1f}",
                f"{generated / together_s:.1f}",
                f"{alone_s / together_s:.2f}x",
                "yes" if together == alone else "NO",
            )
        )
    print_rows(
        ("clients", "one at a time tok/s", "batched tok/s", "batched / one at a time", "same"),
        rows,
    )
    return 0 if all(row[-1] == "yes" for row in rows) else 1
