"""What the self-test chose on this machine (docs/ARCHITECTURE.md §8.1), and its cache file.

A `Tuning` says which scan path takes which prompt lengths and whether one-token steps take the
fused decode kernel. `autotune.py` measures one; the dispatcher reads the cached one once per
process and then only looks it up. The cache is one JSON file recording the machine it was
measured on (chip, OS, MLX and package versions); a file that does not parse, or was written for
another machine or version, is ignored and measured again.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlx.core as mx

CACHE_DIR_ENV = "QWEN35_MLX_CACHE_DIR"  # overrides $XDG_CACHE_HOME/qwen35-mlx
CACHE_FILE_NAME = "autotune.json"
FORMAT = 1  # bumped when the file's layout changes, so that old files are measured again


@dataclass(frozen=True)
class Tuning:
    scan: tuple[tuple[int, str], ...]  # (from this many tokens on, scan path), the first from 1
    decode: str  # one-token steps: "fused" (the Metal decode kernel) or "plain"
    disabled: tuple[tuple[str, str], ...] = ()  # (path, why) paths that failed the self-test

    def scan_path(self, num_tokens: int) -> str:
        path = self.scan[0][1]
        for start, name in self.scan[1:]:
            if num_tokens >= start:
                path = name
        return path

    @classmethod
    def from_json(cls, record: dict) -> Tuning:
        scan = tuple((int(start), str(path)) for start, path in record["scan"])
        if not scan or scan[0][0] != 1 or record["decode"] not in ("fused", "plain"):
            raise ValueError(f"not a tuning: {record}")
        disabled = tuple((str(path), str(why)) for path, why in record["disabled"])
        return cls(scan, record["decode"], disabled)


# The kernels as designed, where nothing was measured: off a real Metal GPU (the emulator tests
# and primitive counts tell the dispatcher it runs on Metal) or before the first self-test.
UNTUNED = Tuning(scan=((1, "metal_chunked"),), decode="fused")


def package_version() -> str:
    try:
        return version("qwen35-mlx")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def machine() -> dict[str, str]:
    """What a measurement holds for: the chip, the OS, the MLX and package versions."""
    device = mx.device_info()
    macos = platform.mac_ver()[0]
    return {
        "chip": f"{device.get('device_name', '?')} ({device.get('architecture', '?')})",
        "os": f"macOS {macos}" if macos else platform.platform(),
        "mlx": mx.__version__,
        "qwen35-mlx": package_version(),
    }


def cache_file() -> Path:
    folder = os.environ.get(CACHE_DIR_ENV)
    if not folder:
        cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(cache_home) / "qwen35-mlx"
    return Path(folder) / CACHE_FILE_NAME


def read_tuning(file: Path, measured_on: dict[str, str]) -> Tuning | None:
    """The tuning in `file` if it was measured on `measured_on`; None if absent, corrupt or
    foreign."""
    try:
        record = json.loads(file.read_text())
        if record["format"] != FORMAT or record["machine"] != measured_on:
            return None
        return Tuning.from_json(record["tuning"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_tuning(file: Path, measured_on: dict[str, str], tuning: Tuning, results: list) -> None:
    """Records `tuning` with the self-test's rows (dicts) for a bug report to quote."""
    record = {"format": FORMAT, "machine": measured_on, "tuning": asdict(tuning)}
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({**record, "results": results}, indent=1) + "\n")
