"""Self-test and time the Gated DeltaNet kernels on this machine: each path is checked against
plain MLX on the CPU and timed; prints a table to paste into a bug report, and on a Mac records
the fastest correct path per prompt length for every later run."""

from __future__ import annotations

import argparse

from ..bench.report import print_rows
from ..gated_delta.autotune import DEFAULT_REPEATS, DEFAULT_TOKENS, NO_METAL, Report, doctor
from ..gated_delta.dispatch import CHUNKED_MIN_TOKENS


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=list(DEFAULT_TOKENS),
        help="prompt lengths to time the scan paths at; each choice holds from its length to "
        "the next (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="timed runs per path and length, after a warm-up (best)",
    )


def correctness(status: str, detail: str) -> str:
    if status == "ok":
        return f"yes ({detail})"
    if status == NO_METAL:
        return status
    return f"NO, disabled ({detail})"


def print_report(report: Report) -> None:
    m = report.machine
    print(
        f"qwen35-mlx doctor | chip: {m['chip']} | OS: {m['os']} | MLX {m['mlx']} | "
        f"qwen35-mlx {m['qwen35-mlx']} | device: {report.device}"
    )
    columns = ("task", "path", "correct", *(f"T={T} ms" for T in report.tokens))
    rows = []
    for r in report.results:
        lengths = report.tokens if r.task == "scan" else (1,)
        times = [f"{r.seconds[T] * 1e3:.3f}" if T in r.seconds else "-" for T in lengths]
        rows.append((r.task, r.path, correctness(r.status, r.detail), *times))
    print_rows(columns, [row + ("",) * (len(columns) - len(row)) for row in rows], text_columns=3)
    ranges = ", ".join(f"{path} from T={start}" for start, path in report.tuning.scan)
    print(f"fastest correct: scan {ranges}; one-token decode {report.tuning.decode}")
    if report.recorded_in is not None:
        print(f"recorded in {report.recorded_in}: every run on this machine uses it")
    else:
        print(
            "not recorded: no Metal here, so the dispatcher keeps its CPU rule (recurrent below "
            f"T={CHUNKED_MIN_TOKENS}, chunked from there)"
        )


def main(args: argparse.Namespace) -> int:
    print_report(doctor(tokens=args.tokens, repeats=args.repeats))
    return 0
