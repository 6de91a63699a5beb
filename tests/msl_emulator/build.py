"""Compiles a translated kernel, with runtime.cpp as a second translation unit, into a shared
library, cached by content hash.

The cache key covers the C++ source, msl.h, runtime.cpp, the compiler and its flags, so an edit to
any of them rebuilds. Cache folder: $QWEN35_MLX_EMULATOR_CACHE, else
~/.cache/qwen35-mlx/msl-emulator. Compiler: $CXX, else g++.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .errors import EmulatorError

HERE = Path(__file__).parent
# -g1: line tables only, so that errors can name the .metal line (launch.kernel_lines);
# stack-clash protection: a frame larger than a fiber's stack hits its guard page.
FLAGS = (
    "-std=c++20",
    "-O2",
    "-g1",
    "-fstack-clash-protection",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
    "-w",
)
compiler_runs = 0  # how many times the compiler ran in this process (the cache test reads it)
_loaded: dict[Path, ctypes.CDLL] = {}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "qwen35-mlx" / "msl-emulator"
    return Path(os.environ.get("QWEN35_MLX_EMULATOR_CACHE", default))


def library(cpp: str, kernel: str) -> ctypes.CDLL:
    """The loaded library for `cpp`, compiling it unless the cache holds it."""
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(
        "\0".join(
            [
                cpp,
                (HERE / "msl.h").read_text(),
                (HERE / "runtime.cpp").read_text(),
                compiler,
                *FLAGS,
            ]
        ).encode()
    ).hexdigest()[:24]
    folder = cache_dir()
    path = folder / f"{kernel[:60]}-{key}.so"
    if path not in _loaded:
        if not path.exists():
            _compile(cpp, path, compiler)
        _loaded[path] = ctypes.CDLL(str(path))
    return _loaded[path]


def _compile(cpp: str, path: Path, compiler: str) -> None:
    global compiler_runs
    if shutil.which(compiler) is None:
        raise EmulatorError(
            f"the MSL emulator needs a C++20 compiler: '{compiler}' is not on PATH "
            "(install g++ or set $CXX)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    source, partial = path.with_suffix(".cpp"), path.with_suffix(f".{os.getpid()}.tmp")
    partial_source = partial.with_suffix(".cpp")
    partial_source.write_text(cpp)
    compiler_runs += 1
    result = subprocess.run(
        [
            compiler,
            *FLAGS,
            f"-I{HERE}",
            str(partial_source),
            str(HERE / "runtime.cpp"),
            "-o",
            str(partial),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    os.replace(partial_source, source)  # kept beside the library for reading
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        errors = "\n".join(result.stderr.splitlines()[:60])
        raise EmulatorError(
            f"the kernel does not compile as C++ under the emulator "
            f"(translated source: {source}):\n{errors}"
        )
    os.replace(partial, path)  # atomic: concurrent runs never load half a library
