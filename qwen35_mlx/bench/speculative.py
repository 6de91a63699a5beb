"""When speculative decoding pays on this machine, measured in one run.

1. Costs, after a prompt of `--context` tokens: one plain decode step; a verify pass of k+1
   tokens (k = 1..max) with each rollback ("steps": every token's DeltaNet state kept;
   "refeed": the pass, then the snapshot restored and one token fed again, its worst case);
   one MTP draft step. Each is the median of `--repeats` timed runs, the cache restored after
   each.
2. The expected speed-up for acceptance rates 0.5 to 0.9 (the same rate at every position)
   from those costs: (1 + a + ... + a^k) tokens per (verify of k+1 + k draft steps), over one
   plain step per token.
3. End to end: greedy decoding of `--tokens` tokens, plain against MTP speculation (adaptive
   k, and fixed k = max), the same tokens required; acceptance by position. A random head
   accepts almost nothing (adaptive k then turns drafting off); `--train-mtp` first trains the
   head on the model's own greedy output (mtp_training.py). Real acceptance needs real weights.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import mlx.core as mx
import numpy as np

from ..generate import check_whole, generate_step
from ..loading import load
from ..speculative import MAX_DRAFT_TOKENS, MTPDrafter, Speculation
from .mtp_training import greedy_sequences, head_accuracy, prompts, train_head
from .report import print_rows, progress

TRAINING_PROMPTS = 16


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (with an MTP head)")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens before timing")
    parser.add_argument("--max-k", type=int, default=4, help="the most drafted tokens timed")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated end to end")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cost")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument(
        "--train-mtp",
        type=int,
        metavar="STEPS",
        help="first train the MTP head this many steps on the model's own greedy output "
        "(a random head drafts nothing useful); then decode prompts like those it trained on",
    )


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_costs(model, prompt: list[int], max_k: int, repeats: int) -> dict:
    """Seconds of a plain step, of verify passes per k and rollback, of an MTP draft step."""
    cache = model.make_cache()
    mx.eval(model(mx.array(prompt)[None], cache=cache, check_ids=False))
    start = cache.snapshot()
    tokens = mx.array(prompt[-max_k - 1 :])

    def forward(count: int, rollback: str | None = None) -> None:
        """`count` tokens through the model, rolled back to one by `rollback`, then undone."""
        cache.record_steps(rollback == "steps")
        out = model(tokens[:count][None], cache=cache, check_ids=False, return_hidden=True)
        mx.eval(out)
        if rollback == "steps":
            cache.drop_last(count - 1)
        elif rollback == "refeed":
            cache.restore(start, owned=True)
            mx.eval(model(tokens[:1][None], cache=cache, check_ids=False))
        mx.eval(cache.state)
        cache.record_steps(False)
        cache.restore(start, owned=True)

    costs = {"plain": median_seconds(lambda: forward(1), repeats), "verify": {}}
    for k in range(1, max_k + 1):
        for rollback in ("steps", "refeed"):
            run = functools.partial(forward, k + 1, rollback)
            costs["verify"][k, rollback] = median_seconds(run, repeats)
    costs["draft"] = None
    if model.mtp is not None:
        drafter = MTPDrafter(model)
        drafter.start(0, 0)
        hidden = model(mx.array(prompt)[None], check_ids=False, return_hidden=True)[1]
        drafter.feed(prompt, hidden)
        mx.eval(drafter.state)

        def draft_one() -> None:
            drafts, _ = drafter.draft(prompt[-1], 1, None)
            mx.eval(drafts)

        costs["draft"] = median_seconds(draft_one, repeats)
    return costs


def expected_speedup(rate: float, k: int, plain: float, verify: float, draft: float) -> float:
    tokens = sum(rate**i for i in range(k + 1))
    return tokens * plain / (verify + k * draft)


def decode(model, prompt, tokens: int, speculation=None) -> tuple[list[int], float]:
    start = time.perf_counter()
    steps = generate_step(mx.array(prompt), model, max_tokens=tokens, speculation=speculation)
    out = [token for token, _ in steps]
    return out, time.perf_counter() - start


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag, before any work."""
    for flag, value in (("--context", args.context), ("--tokens", args.tokens)):
        check_whole(flag, value, 1)
    check_whole("--repeats", args.repeats, 1)
    if args.train_mtp is not None:
        check_whole("--train-mtp", args.train_mtp, 1)
    if not 1 <= args.max_k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"--max-k must be from 1 to {MAX_DRAFT_TOKENS}, got {args.max_k}")


def bench_speculative(args: argparse.Namespace) -> int:
    check_args(args)
    model, _ = load(args.model)
    vocab = model.config.text.vocab_size
    prompt = np.random.default_rng(args.seed).integers(0, vocab, size=args.context).tolist()
    progress(f"costs after a {args.context}-token prompt, median of {args.repeats}")
    costs = measure_costs(model, prompt, args.max_k, args.repeats)
    plain, draft = costs["plain"], costs["draft"]
    print(f"plain decode step: {plain * 1e3:.2f} ms")
    if draft is not None:
        print(f"MTP draft step: {draft * 1e3:.2f} ms ({draft / plain:.2f}x a decode step)")
    print_rows(
        ("k", "verify steps ms", "/ decode", "verify refeed ms", "/ decode"),
        [
            (
                k,
                f"{costs['verify'][k, 'steps'] * 1e3:.2f}",
                f"{costs['verify'][k, 'steps'] / plain:.2f}x",
                f"{costs['verify'][k, 'refeed'] * 1e3:.2f}",
                f"{costs['verify'][k, 'refeed'] / plain:.2f}x",
            )
            for k in range(1, args.max_k + 1)
        ],
    )
    if draft is None:
        print("no MTP head: no draft step, no end-to-end run")
        return 0
    print("\nexpected speed-up (rollback by steps) by acceptance rate per position:")
    rates = (0.5, 0.6, 0.7, 0.8, 0.9)
    print_rows(
        ("k", *(f"a={rate}" for rate in rates)),
        [
            (
                k,
                *(
                    f"{expected_speedup(rate, k, plain, costs['verify'][k, 'steps'], draft):.2f}x"
                    for rate in rates
                ),
            )
            for k in range(1, args.max_k + 1)
        ],
    )
    if args.train_mtp:
        progress(f"training the MTP head, {args.train_mtp} steps")
        train = greedy_sequences(model, prompts(TRAINING_PROMPTS, args.seed, vocab))
        train_head(model, train, steps=args.train_mtp)
        held_out = prompts(TRAINING_PROMPTS, args.seed + 1, vocab)
        accuracy = head_accuracy(model, greedy_sequences(model, held_out))
        print(f"\ntrained MTP head: top-1 {accuracy:.2f} on held-out continuations")
        prompt = held_out[0].tolist()
    progress(f"end to end: {args.tokens} greedy tokens")
    decode(model, prompt, 4)  # warm-up
    expected, plain_seconds = decode(model, prompt, args.tokens)
    rows = [("plain", f"{args.tokens / plain_seconds:.1f}", "1.00x", "-", "-")]
    for name, adaptive in (("MTP adaptive k", True), (f"MTP k={args.max_k}", False)):
        speculation = Speculation(MTPDrafter(model), args.max_k, adaptive)
        tokens, seconds = decode(model, prompt, args.tokens, speculation)
        if tokens != expected:
            raise RuntimeError(f"{name}: the speculative tokens differ from plain greedy's")
        stats = speculation.stats
        by_position = " ".join(
            f"{a / d:.2f}" for a, d in zip(stats.accepted_at, stats.drafted_at, strict=True)
        )
        rows.append(
            (
                name,
                f"{args.tokens / seconds:.1f}",
                f"{plain_seconds / seconds:.2f}x",
                f"{stats.acceptance:.2f}",
                by_position or "-",
            )
        )
    print()
    print_rows(("decoding", "tokens/s", "speed-up", "acceptance", "by position"), rows)
    return 0
