"""Start-up cost: how much longer `import qwen35_mlx` takes than `import mlx.core`, each timed
inside fresh Python processes (alternating, median of N), and which heavy libraries it pulls in.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from .report import print_rows

HEAVY = ("transformers", "torch", "mlx_lm")  # none of them belongs in a run-time import
CHILD = """
import json, sys, time
start = time.perf_counter()
import {module}
elapsed = time.perf_counter() - start
print(json.dumps([elapsed, [m for m in {heavy!r} if m in sys.modules]]))
"""


def time_import(module: str) -> tuple[float, list[str]]:
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(module=module, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed, heavy = json.loads(child.stdout)
    return elapsed, heavy


def bench_startup(repeats: int, module: str = "qwen35_mlx") -> int:
    if repeats < 1:
        raise ValueError("--repeats must be at least 1")
    times: dict[str, list[float]] = {"mlx.core": [], module: []}
    heavy: list[str] = []
    for _ in range(repeats):  # alternating, so that a busy machine slows both alike
        for name in times:
            elapsed, pulled = time_import(name)
            times[name].append(elapsed)
            heavy = heavy or pulled
    base, ours = (statistics.median(times[name]) for name in times)
    print_rows(
        ("import", "median s", "runs"),
        [
            [name, f"{statistics.median(runs):.3f}", " ".join(f"{t:.3f}" for t in runs)]
            for name, runs in times.items()
        ],
    )
    print(
        f"{module} costs {ours - base:+.3f} s over mlx.core (median of {repeats} fresh "
        f"processes each)"
    )
    print(f"heavy libraries imported: {', '.join(heavy) if heavy else 'none'}")
    return 1 if heavy else 0
