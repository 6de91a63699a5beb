"""A prefill progress bar on stderr, fed by `generate_step`'s `progress(done, total)` callback.

Shown for prompts longer than one prefill step (shorter ones are through in one forward pass,
before a bar could say anything). On a terminal the bar redraws one line and erases it when
the prompt is through, so the reply starts on a clean line; elsewhere (a log file, forced with
--progress) it writes one plain line per step instead of carriage returns.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TextIO


class PrefillBar:
    """progress(done, total) -> "prefill 4096/32768 tokens 12% 512 tok/s" on `stream`.

    Args:
        prefill_step_size: tokens per prefill step; prompts of at most this many get no bar.
        stream: where to write (default: sys.stderr at the time of each call).
        clock: seconds, for the rate (time.perf_counter).
    """

    def __init__(
        self,
        prefill_step_size: int,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.prefill_step_size = prefill_step_size
        self.stream = stream
        self.clock = clock
        self.started: float | None = None  # when the current prompt's prefill began

    def __call__(self, done: int, total: int) -> None:
        if total <= self.prefill_step_size:
            return
        if done == 0 or self.started is None:  # a new prompt
            self.started = self.clock()
        out = self.stream or sys.stderr
        line = self.line(done, total, self.clock() - self.started)
        if out.isatty():
            out.write("\r" + line + ("\r\033[K" if done >= total else ""))
        else:
            out.write(line + "\n")
        out.flush()
        if done >= total:
            self.started = None

    @staticmethod
    def line(done: int, total: int, seconds: float) -> str:
        """The bar's text for `done` of `total` tokens after `seconds`."""
        rate = f" {done / seconds:.0f} tok/s" if done and seconds > 0 else ""
        return f"prefill {done}/{total} tokens {100 * done // total}%{rate}"


def progress_kwargs(
    show: bool | None, prefill_step_size: int, stream: TextIO | None = None
) -> dict:
    """{"progress": PrefillBar} for stream_generate when the bar is shown, else {}.

    Args:
        show: True always, False never, None when `stream` (stderr) is a terminal.
        prefill_step_size: the generation's prefill step.
        stream: the bar's stream (default sys.stderr).
    """
    out = stream or sys.stderr
    if show is False or (show is None and not out.isatty()):
        return {}
    return {"progress": PrefillBar(prefill_step_size, stream)}


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a prefill progress bar on stderr for prompts longer than one "
        "prefill step (default: when stderr is a terminal)",
    )
