"""Compiles MLX's generated source of a kernel with clang in C++ for OpenCL mode against
msl_strict.h, which enforces what the emulator's C++ does not: address spaces, no `double`,
exact simdgroup matrix element types. Clang's AST then shows the lambdas and recursion that Metal
also rejects.

The source is the one `msl_emulator.generated_source` captures from MLX, changed only where
OpenCL needs it: the template parameters become constants (OpenCL kernels cannot be templates),
`[[kernel]]` becomes `__kernel`, and the explicit instantiation goes. Results are cached by a hash
of (source, msl_strict.h, clang's version, flags) in $QWEN35_MLX_STRICT_CACHE, else
~/.cache/qwen35-mlx/msl-strict.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

from msl_emulator import generated_source

HERE = Path(__file__).parent
HEADER = HERE / "msl_strict.h"
FLAGS = (
    "-x",
    "cl",
    "-cl-std=clc++2021",
    "-fsyntax-only",
    "-Xclang",
    "-cl-ext=-cl_khr_fp64,-__opencl_c_fp64",  # Metal has no double
    "-Wno-unknown-attributes",  # [[buffer(0)]], [[thread_position_in_grid]], ...
    f"-I{HERE}",
    "-Xclang",
    "-ast-dump=json",
)
compiler_runs = 0  # how many times clang ran in this process (the cache test reads it)


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
        "\0".join([text, HEADER.read_text(), _clang_version(), *FLAGS]).encode()
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
def _clang_version() -> str:
    if shutil.which("clang") is None:
        raise StrictError(
            "the strict Metal check needs clang, which is not on PATH: apt-get install clang"
        )
    return subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout


def _check(text: str) -> str:
    global compiler_runs
    compiler_runs += 1
    result = subprocess.run(
        ["clang", *FLAGS, "-"], input=text, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return result.stderr
    return "\n".join(_language_errors(json.loads(result.stdout)))


def _language_errors(ast: dict) -> list[str]:
    """Lambdas and recursive calls in the translation unit (Metal has neither)."""
    names, previous, calls = {}, {}, defaultdict(set)
    errors = []
    stack = [(ast, None)]
    while stack:
        node, function = stack.pop()
        kind = node.get("kind")
        if kind in ("FunctionDecl", "CXXMethodDecl"):
            names[node["id"]] = node.get("name", "?")
            if "previousDecl" in node:
                previous[node["id"]] = node["previousDecl"]
            if any(child.get("kind") == "CompoundStmt" for child in node.get("inner", ())):
                function = node["id"]
        elif kind == "LambdaExpr":
            errors.append(f"error: lambda expression in '{names.get(function, '?')}'")
        elif function and kind in ("DeclRefExpr", "MemberExpr"):
            callee = node.get("referencedDecl") or node.get("referencedMemberDecl")
            if isinstance(callee, dict) and callee.get("kind") in ("FunctionDecl", "CXXMethodDecl"):
                calls[function].add(callee["id"])
            elif isinstance(callee, str):
                calls[function].add(callee)
        stack.extend((child, function) for child in node.get("inner", ()))

    def first(decl):
        while decl in previous:
            decl = previous[decl]
        return decl

    graph = defaultdict(set)
    for caller, callees in calls.items():
        graph[first(caller)].update(first(callee) for callee in callees)
    return errors + [
        f"error: recursive call: {' -> '.join(names.get(f, '?') for f in cycle)}"
        for cycle in _cycles(graph)
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
