"""Compiles a translated kernel into a shared library linked with runtime.cpp's object, both
cached by content hash.

runtime.cpp's object is keyed by runtime.cpp, msl.h, the compiler and its flags; a kernel's
library by its C++ source and that object, so an edit to any of them rebuilds. Cache folder:
$QWEN35_MLX_EMULATOR_CACHE, else ~/.cache/qwen35-mlx/msl-emulator. Compiler: $CXX, else g++.
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
    "-fPIC",
    "-fvisibility=hidden",
    "-w",
)
compiler_runs = 0  # kernels compiled in this process (the cache test reads it)
runtime_builds = 0  # runtime.cpp objects compiled in this process (likewise)
_loaded: dict[Path, ctypes.CDLL] = {}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "qwen35-mlx" / "msl-emulator"
    return Path(os.environ.get("QWEN35_MLX_EMULATOR_CACHE", default))


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def library(cpp: str, kernel: str) -> ctypes.CDLL:
    """The loaded library for `cpp`, compiling it unless the cache holds it."""
    global compiler_runs
    compiler = os.environ.get("CXX", "g++")
    runtime = _runtime_object(compiler)
    path = cache_dir() / f"{kernel[:60]}-{_key(cpp, runtime.name)}.so"
    if path not in _loaded:
        if not path.exists():
            compiler_runs += 1
            source = path.with_suffix(".cpp")
            _build(compiler, cpp, source, path, ["-shared", str(runtime)])
        _loaded[path] = ctypes.CDLL(str(path))
    return _loaded[path]


def _runtime_object(compiler: str) -> Path:
    """runtime.cpp compiled once for every kernel to link (it takes as long as a kernel), cached
    by msl.h, runtime.cpp, the compiler and its flags."""
    global runtime_builds
    runtime = (HERE / "runtime.cpp").read_text()
    key = _key(runtime, (HERE / "msl.h").read_text(), compiler, *FLAGS)
    path = cache_dir() / f"runtime-{key}.o"
    if not path.exists():
        runtime_builds += 1
        _build(compiler, runtime, None, path, ["-c"])
    return path


def _build(compiler: str, cpp: str, source: Path | None, path: Path, extra: list[str]) -> None:
    """Compiles `cpp` into `path` (written whole or not at all); the source is kept at `source`
    for reading, if given."""
    if shutil.which(compiler) is None:
        raise EmulatorError(
            f"the MSL emulator needs a C++20 compiler: '{compiler}' is not on PATH "
            "(install g++ or set $CXX)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial_source = partial.with_suffix(".cpp")
    partial_source.write_text(cpp)
    result = subprocess.run(
        [compiler, *FLAGS, f"-I{HERE}", str(partial_source), *extra, "-o", str(partial)],
        capture_output=True,
        text=True,
        check=False,
    )
    if source is None:
        partial_source.unlink()
    else:
        os.replace(partial_source, source)  # kept beside the library for reading
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        errors = "\n".join(result.stderr.splitlines()[:60])
        what = f"the kernel (translated source: {source})" if source else HERE / "runtime.cpp"
        raise EmulatorError(f"{what} does not compile as C++ under the emulator:\n{errors}")
    os.replace(partial, path)  # atomic: concurrent runs never load half a library
