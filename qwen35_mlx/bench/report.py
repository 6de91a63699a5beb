"""What the benchmarks print: progress lines on stderr, aligned tables on stdout."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_rows(columns: Sequence[str], rows: Sequence[Sequence], text_columns: int = 1) -> None:
    """A table: the first `text_columns` columns left-aligned, the numbers right-aligned."""
    table = [[str(cell) for cell in row] for row in [columns, *rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print(
            "  ".join(
                cell.ljust(w) if i < text_columns else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
