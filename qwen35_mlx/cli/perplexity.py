"""Perplexity of a UTF-8 text file: how well the model predicts each token from those before it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..loading import load
from ..score import score
from .options import add_model_args, load_kwargs


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument(
        "--file",
        required=True,
        type=Path,
        help="the UTF-8 text file to score, tokenized as is (no chat template)",
    )
    parser.add_argument(
        "--prefill-step-size",
        type=int,
        default=512,
        help="tokens per forward pass; memory grows with it, not with the text",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="score only the first N tokens of the file (default: all)",
    )
    parser.set_defaults(max_pixels=None)  # load_kwargs reads it; no images here


def main(args: argparse.Namespace) -> int:
    text = read_text(args.file)  # before loading: a bad file fails fast
    model, tokenizer = load(args.model, **load_kwargs(args))
    result = score(
        model,
        tokenizer,
        text,
        prefill_step_size=args.prefill_step_size,
        max_tokens=args.max_tokens,
        progress=ProgressLine(),
    )
    print(
        f"tokens: {result.num_scored} | mean NLL: {result.mean_nll:.4f} | "
        f"perplexity: {result.perplexity:.4f}"
    )
    return 0


def read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a UTF-8 text file with --file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at "
            f"offset {error.start}); convert it to UTF-8, e.g. with iconv"
        ) from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; give it some text to score")
    return text


class ProgressLine:
    """progress(done, total) for `score`: one line on stderr, rewritten in place."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        rate = f"{done / elapsed:.1f} tokens/s" if done and elapsed > 0 else "starting"
        percent = 100 * done // total
        print(
            f"\rscoring: {done}/{total} tokens ({percent}%) | {rate}",
            end="",
            file=sys.stderr,
            flush=True,
        )
        if done == total:
            print(file=sys.stderr)
