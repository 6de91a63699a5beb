"""From a KernelSpec to C++: the exact Metal source MLX generates, rewritten for msl.h.

MLX prints the source it would compile when `mx.fast.metal_kernel(...)(verbose=True)` is traced
by `mx.export_function` (which records and does not run it, so this works without Metal). The
rewrite is mechanical: the signature becomes a plain function called by a per-thread `run_thread`,
`device`/`constant`/`threadgroup` pointers become bounds-checked `msl::ptr`, `threadgroup`
variables become one shared, poisoned allocation per threadgroup, and thread-local arrays become
bounds-checked `msl::tarr`. `#line` directives keep error positions in the `.metal` files.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import sys
import tempfile
from dataclasses import dataclass

import mlx.core as mx

from .arrays import KernelInput
from .errors import EmulatorError


def generated_source(spec, inputs, launch) -> str:
    """The Metal source MLX generates for `spec` called on `inputs` (as for `emulate`)."""
    examples = [
        (x if isinstance(x, KernelInput) else KernelInput(x, name)).example
        for x, name in zip(inputs, spec.input_names)
    ]

    def call(*arrays):  # the MLX kernel itself, not spec.run (tests may route that here)
        return spec.build()(inputs=list(arrays), **launch.kwargs(), verbose=True)

    with tempfile.TemporaryDirectory() as directory:
        printed = _captured_stdout(
            lambda: mx.export_function(os.path.join(directory, "k.mlxfn"), call, *examples)
        )
    found = re.search(r"```\n(.*?)```", printed, re.DOTALL)
    if not found:
        raise EmulatorError(f"kernel '{spec.name}': MLX printed no generated source:\n{printed}")
    return found.group(1)


def _captured_stdout(action) -> str:
    """What `action` writes to file descriptor 1 (MLX prints from C++)."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            os.dup2(sink.fileno(), 1)
            action()
        finally:
            libc.fflush(None)  # std::cout goes through C stdio, fully buffered on a file
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode()


@dataclass(frozen=True)
class Param:
    type: str  # C++ type after the rewrite
    name: str
    attribute: str  # "buffer" or the thread attribute's name
    index: int  # buffer index, -1 for attributes
    element: str  # pointee / referenced type for buffers
    pointer: bool


@dataclass(frozen=True)
class Translation:
    cpp: str
    kernel: str
    params: tuple[Param, ...]


_SIGNATURE = re.compile(
    r"(?P<template>template\s*<[^>]*>\s*)?\[\[kernel\]\]\s*void\s+(?P<name>\w+)\s*"
    r"\((?P<params>.*?)\)\s*\{",
    re.DOTALL,
)
_PARAM = re.compile(r"^(?P<decl>.*?)\s*\[\[(?P<attr>\w+)(?:\((?P<index>\d+)\))?\]\]$", re.DOTALL)
_TYPE = r"[A-Za-z_][\w:]*(?:\s*<[^<>;()]*>)?"
_QUALIFIED_POINTER = re.compile(
    rf"(?P<c1>\bconst\s+)?\b(?P<space>device|constant|threadgroup)\s+(?P<c2>const\s+)?"
    rf"(?P<type>{_TYPE})\s*\*"
)
_THREADGROUP_VAR = re.compile(
    rf"\bthreadgroup\s+(?P<type>{_TYPE})\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\]\s*)*);"
)
_SCALARS = (
    "float",
    "half",
    "bfloat",
    "int",
    "uint",
    "short",
    "ushort",
    "char",
    "uchar",
    "bool",
    "long",
    "ulong",
    "float16_t",
    "bfloat16_t",
    "int32_t",
    "uint32_t",
    "int64_t",
    "uint64_t",
    "int16_t",
    "uint16_t",
    "size_t",
)
_LOCAL_ARRAY = re.compile(  # scalar / vector / template-parameter (capitalised) element types
    rf"(?P<lead>(?:^|[;{{}}])\s*)(?P<const>const\s+)?(?:thread\s+)?"
    rf"(?P<type>(?:{'|'.join(_SCALARS)})[234]?|[A-Z]\w*)"
    r"\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\]\s*)+)(?P<end>;|(?==))",
    re.MULTILINE,
)
_HALF_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?[hH]\b")


def _pointer(match: re.Match) -> str:
    const = "const " if match["c1"] or match["c2"] else ""
    return f"msl::ptr<{const}{match['type']}>"


def _array_type(element: str, dims: str) -> str:
    sizes = re.findall(r"\[([^\]]+)\]", dims)
    for size in reversed(sizes):
        element = f"msl::tarr<{element}, {size.strip()}>"
    return element


def _rewrite_common(text: str) -> str:
    text = _QUALIFIED_POINTER.sub(_pointer, text)
    return _HALF_LITERAL.sub(lambda m: f"half({m[1]}{m[2] or ''})", text)


def _rewrite_body(body: str) -> str:
    body = _rewrite_common(body)
    slots = itertools.count()

    def shared(m: re.Match) -> str:
        kind = _array_type(m["type"], m["dims"])
        return f'auto& {m["name"]} = msl::threadgroup_var<{kind}>({next(slots)}, "{m["name"]}");'

    def local(m: re.Match) -> str:
        declared = f"{m['lead']}{m['const'] or ''}{_array_type(m['type'], m['dims'])} {m['name']}"
        # without an initialiser: poisoned, differently per thread order
        return (
            f"{declared}; msl::poison(&{m['name']}, sizeof {m['name']});" if m["end"] else declared
        )

    body = _THREADGROUP_VAR.sub(shared, body)
    return _LOCAL_ARRAY.sub(local, body)


def _split_params(text: str) -> list[str]:
    """The parameters of a signature, split at the commas outside <> and ()."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "<(":
            depth += 1
        elif char in ">)":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _param(text: str, kernel: str) -> Param:
    found = _PARAM.match(text)
    if not found:
        raise EmulatorError(f"kernel '{kernel}': cannot parse parameter '{text}'")
    decl, attribute = found["decl"], found["attr"]
    name = re.search(r"(\w+)$", decl)[1]
    type_text = decl[: -len(name)].strip()
    if "atomic" in type_text:
        raise EmulatorError(f"kernel '{kernel}': atomic outputs are not supported by the emulator")
    if attribute != "buffer":
        return Param(type_text, name, attribute, -1, "", False)
    pointer = type_text.endswith("*")
    element = re.sub(r"\b(const|device|constant)\b", "", type_text.rstrip("*&")).strip()
    const = "const " if "const" in type_text.split() else ""
    cpp_type = f"msl::ptr<{const}{element}>" if pointer else f"const {element}&"
    return Param(cpp_type, name, "buffer", int(found["index"]), const + element, pointer)


def translate(spec, source: str) -> Translation:
    """C++ for `source` (as MLX generated it for `spec`), defining extern "C" run_thread."""
    signature = _SIGNATURE.search(source)
    if not signature:
        raise EmulatorError(f"kernel '{spec.name}': no [[kernel]] signature in:\n{source}")
    kernel = signature["name"]
    header = source[: signature.start()]
    end = source.rindex("}", signature.end(), _instantiation_start(source))
    body = source[signature.end() : end]
    params = tuple(_param(p, spec.name) for p in _split_params(signature["params"]))
    template_args = re.search(r"decltype\(\w+<(.*)>\)", source[end:])
    call = kernel + (f"<{template_args[1]}>" if template_args else "")

    at = body.find(spec.source) if spec.source.strip() else -1
    lead, body = (body[:at], body[at:]) if at >= 0 else ("", body)
    arguments = ",\n    ".join(_argument(p) for p in params)
    cpp = "\n".join(
        [
            '#include "msl.h"',
            f'#line 1 "{os.path.basename(str(spec.header_file))}"' if spec.header_file else "",
            _rewrite_common(header),
            signature["template"] or "",
            f"void {kernel}({', '.join(f'{p.type} {p.name}' for p in params)}) {{{lead}",
            f'#line 1 "{os.path.basename(str(spec.source_file))}"',
            _rewrite_body(body),
            "}",
            '#line 1 "generated"',
            (
                'extern "C" void run_thread(void* const* b, const msl::Region* regions, '
                "const msl::Attrs& a) {"
            ),
            f"  {call}(\n    {arguments});",
            "}",
            "",
        ]
    )
    return Translation(cpp, kernel, params)


def _instantiation_start(source: str) -> int:
    found = re.search(r"template\s*\[\[host_name", source)
    return found.start() if found else len(source)


def _argument(p: Param) -> str:
    if p.attribute != "buffer":
        return f"a.{p.attribute}"
    if p.pointer:
        return f"{p.type}(static_cast<{p.element}*>(b[{p.index}]), &regions[{p.index}])"
    return f"*static_cast<{p.element}*>(b[{p.index}])"
