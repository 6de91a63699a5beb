"""Parses MLX's generated source of a kernel with clang (libclang, the `libclang` wheel of the
test extra) in C++ for OpenCL mode against msl_strict.h, which enforces what the emulator's C++
does not: address spaces, no `double`, exact simdgroup matrix element types. Clang's AST then
shows the lambdas and recursion that Metal also rejects.

The source is the one `msl_emulator.generated_source` captures from MLX, changed only where
OpenCL needs it: the template parameters become constants (OpenCL kernels cannot be templates),
`[[kernel]]` becomes `__kernel`, and the explicit instantiation goes. Results are cached by a hash
of (source, msl_strict.h, libclang's version, flags) in $QWEN35_MLX_STRICT_CACHE, else
~/.cache/qwen35-mlx/msl-strict.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import json
import os
import re
from collections import defaultdict
from pathlib import Path

from clang import cindex

from msl_emulator import generated_source

HERE = Path(__file__).parent
HEADER = HERE / "msl_strict.h"
FLAGS = (
    "-x",
    "cl",
    "-cl-std=clc++2021",
    "-cl-no-stdinc",  # the libclang wheel ships no OpenCL headers; msl_strict.h declares all
    "-Xclang",
    "-cl-ext=-cl_khr_fp64,-__opencl_c_fp64",  # Metal has no double
    "-Wno-unknown-attributes",  # [[buffer(0)]], [[thread_position_in_grid]], ...
    f"-I{HERE}",
)
SOURCE_NAME = "kernel.cl"
compiler_runs = 0  # how many times libclang parsed in this process (the cache test reads it)


class StrictError(Exception):
    """A kernel that Apple's Metal compiler would reject."""


def strict_check(spec, inputs, launch) -> None:
    """Raises StrictError unless MLX's source for `spec` called on `inputs` passes the check."""
    text = strict_source(spec, generated_source(spec, inputs, launch))
    errors = _cached_errors(text)
    if errors:
        raise StrictError(f"kernel '{spec.name}' fails the strict Metal check:\n{errors}")


_TEMPLATE = re.compile(r"template\s*<(?P<params>[^>]*)>\s*(?=\[\[kernel\]\])")
_INSTANTIATION = re.compile(r"template\s*\[\[host_name.*", re.DOTALL)
_TEMPLATE_ARGS = re.compile(r"decltype\(\w+<(?P<args>.*?)>\)")


def strict_source(spec, source: str) -> str:
    """`source` (as MLX generated it for `spec`) as msl_strict.h's OpenCL C++ takes it."""
    instantiation = _INSTANTIATION.search(source)
    kernel_end = instantiation.start() if instantiation else len(source)
    template = _TEMPLATE.search(source)
    constants = ""
    if template:
        args = _TEMPLATE_ARGS.search(source[kernel_end:])["args"].split(",")
        constants = "\n".join(
            _constant(param.strip(), arg.strip())
            for param, arg in zip(template["params"].split(","), args, strict=True)
        )
        source = source[: template.start()] + constants + "\n" + source[template.end() : kernel_end]
    else:
        source = source[:kernel_end]
    source = source.replace("[[kernel]] void", "__kernel void", 1)
    body = source.find(spec.source) if spec.source.strip() else -1
    if body >= 0:  # diagnostics name the .metal file's lines
        name = os.path.basename(str(spec.source_file))
        source = f'{source[:body]}\n#line 1 "{name}"\n{source[body:]}'
    return f'#include "msl_strict.h"\n{source}'


def _constant(param: str, arg: str) -> str:
    kind, name = param.rsplit(maxsplit=1)
    if kind in ("typename", "class"):
        return f"typedef {arg} {name};"
    return f"constexpr {kind} {name} = {arg};"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "qwen35-mlx" / "msl-strict"
    return Path(os.environ.get("QWEN35_MLX_STRICT_CACHE", default))


def _cached_errors(text: str) -> str:
    """What the check finds in `text` ('' when nothing), from the cache when it holds it."""
    key = hashlib.sha256(
        "\0".join([text, HEADER.read_text(), clang_version(), *FLAGS]).encode()
    ).hexdigest()[:24]
    path = cache_dir() / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())["errors"]
    errors = _check(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"errors": errors}))
    os.replace(partial, path)  # atomic: concurrent runs never read half a result
    return errors


@functools.cache
def clang_version() -> str:
    """The version of libclang (the `libclang` package of the test extra) that checks."""
    return importlib.metadata.version("libclang")


def _check(text: str) -> str:
    global compiler_runs
    compiler_runs += 1
    unit = cindex.Index.create().parse(
        SOURCE_NAME, args=list(FLAGS), unsaved_files=[(SOURCE_NAME, text)]
    )
    errors = [
        line
        for diagnostic in unit.diagnostics
        if diagnostic.severity >= cindex.Diagnostic.Error
        for line in (_format(diagnostic), *map(_format, diagnostic.children))
    ]
    return "\n".join(errors or _language_errors(unit.cursor))


cindex.conf.lib.clang_getPresumedLocation.argtypes = [
    cindex.SourceLocation,
    ctypes.POINTER(cindex._CXString),
    ctypes.POINTER(ctypes.c_uint),
    ctypes.POINTER(ctypes.c_uint),
]
SEVERITIES = {cindex.Diagnostic.Note: "note", cindex.Diagnostic.Warning: "warning"}


def _format(diagnostic) -> str:
    """As clang prints it, at the presumed location (`#line` names the .metal file)."""
    name, line, column = cindex._CXString(), ctypes.c_uint(), ctypes.c_uint()
    cindex.conf.lib.clang_getPresumedLocation(
        diagnostic.location, ctypes.byref(name), ctypes.byref(line), ctypes.byref(column)
    )
    where = f"{cindex._CXString.from_result(name)}:{line.value}:{column.value}"
    severity = SEVERITIES.get(diagnostic.severity, "error")
    return f"{where}: {severity}: {diagnostic.spelling}"


FUNCTIONS = (
    cindex.CursorKind.FUNCTION_DECL,
    cindex.CursorKind.CXX_METHOD,
    cindex.CursorKind.FUNCTION_TEMPLATE,
)


def _language_errors(root) -> list[str]:
    """Lambdas and recursive calls in the translation unit (Metal has neither)."""
    errors, calls, names = [], defaultdict(set), {}
    stack = [(root, None)]
    while stack:
        cursor, function = stack.pop()
        if cursor.kind in FUNCTIONS and cursor.is_definition():
            function = cursor.canonical.get_usr()
            names[function] = cursor.spelling
        elif cursor.kind == cindex.CursorKind.LAMBDA_EXPR:
            errors.append(f"error: lambda expression in '{names.get(function, '?')}'")
        elif function and cursor.kind == cindex.CursorKind.CALL_EXPR and cursor.referenced:
            calls[function].add(cursor.referenced.canonical.get_usr())
        stack.extend((child, function) for child in cursor.get_children())
    return errors + [
        f"error: recursive call: {' -> '.join(names.get(f, '?') for f in cycle)}"
        for cycle in _cycles(calls)
    ]


def _cycles(graph: dict) -> list[list]:
    """One cycle through each function that reaches itself, as the path back to it."""
    found = []
    for start in list(graph):
        path = _path(graph, start, start)
        if path and not any(start in cycle for cycle in found):
            found.append([start, *path])
    return found


def _path(graph: dict, start, goal) -> list | None:
    """The calls from `start` to `goal` (at least one), or None."""
    seen, stack = set(), [(callee, [callee]) for callee in graph.get(start, ())]
    while stack:
        node, path = stack.pop()
        if node == goal:
            return path
        if node not in seen:
            seen.add(node)
            stack.extend((callee, [*path, callee]) for callee in graph.get(node, ()))
    return None
