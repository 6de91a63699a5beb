"""Self-test and autotune of the Gated DeltaNet paths (docs/ARCHITECTURE.md §8.1).

Every candidate (the scan paths, the decode paths) is run on small inputs at the real head
layouts and compared with the plain-MLX path on the CPU; one that raises (a kernel that does not
compile) or disagrees is disabled with a one-line warning. The correct ones are timed at a few
prompt lengths, and the fastest per length range is recorded (`tuning.py`) for the dispatcher.
On a Mac this runs once per chip, macOS, MLX and package version, when the first model loads,
and again whenever `qwen35-mlx doctor` is run; elsewhere only `doctor` runs it, to report.

The candidates, the clock and the lengths are parameters, so that tests can hand in a kernel
that raises, one that is wrong and a fake clock.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

from ..bench.random_checkpoint import config_json
from ..models.config import ModelConfig
from ..models.text import GatedDeltaNet
from . import dispatch
from .recurrent import recurrent_scan
from .tuning import Tuning, cache_file, machine, read_tuning, write_tuning

CHECK_SIZES = ("0.8B", "9B")  # the two head layouts: Hv = Hk = 16, and Hk = 16, Hv = 32
DECODE_CHECKS = (("0.8B", mx.float32), ("9B", mx.bfloat16))  # the last one is also timed
CHECK_TOKENS = (1, 7, 40)  # one token, less than a chunk, several chunks and a partial one
TIMING_SIZE = "9B"  # the larger layout decides
# lengths timed, each choice holding up to the next; the per-token loops keep every step's
# state alive until evaluated (2.2 MB a token with the 9B heads, measured on the CPU backend:
# 2.2 GB at 1024 tokens), which the first model load on an 8 GB Mac must bear
DEFAULT_TOKENS = (1, 16, 128, 1024)
DEFAULT_REPEATS = 3
# relative RMS error against the plain path on the CPU, by activation dtype: in float32 the
# paths differ only in the order of their sums; in bfloat16 (the decode check at the 9B heads,
# as the model runs) also in where they round, ~7e-3 measured for the fused step
TOLERANCE = {mx.float32: 1e-4, mx.bfloat16: 2e-2}
NO_METAL = "not available (no Metal)"
DECODE_HIDDEN = 256

Timer = Callable[[str, int, Callable[[], object]], float]  # (path, tokens, call) -> seconds


@dataclass(frozen=True)
class Candidate:
    name: str  # the path name `pick_path` or a layer's `decode_path` uses
    run: Callable[..., Sequence[mx.array]]  # the task's inputs -> its outputs
    metal: bool = False  # runs only on a Metal GPU


@dataclass(frozen=True)
class Case:
    inputs: tuple  # a task's inputs, as its candidates take them
    tolerance: float  # relative error allowed against the plain path


@dataclass
class Result:
    task: str  # "scan" or "decode"
    path: str
    status: str  # "ok", "wrong", "error" or NO_METAL
    detail: str = ""  # the worst relative error, or the error
    seconds: dict[int, float] = field(default_factory=dict)  # tokens -> best time


def layer_decode(decode_path: str) -> Callable:
    """One token through a DeltaNet layer on `decode_path`: (layer, x, conv_state, state) ->
    (out, conv_state, state)."""

    def step(layer: GatedDeltaNet, x, conv_state, state):
        cache = [conv_state, state]
        forced, layer.decode_path = layer.decode_path, decode_path
        try:
            return layer(x, cache), cache[0], cache[1]
        finally:
            layer.decode_path = forced

    return step


def scan_candidates() -> list[Candidate]:
    plain = [Candidate(name, scan) for name, scan in dispatch.PLAIN_PATHS.items()]
    return plain + [Candidate(name, scan, True) for name, scan in dispatch.METAL_PATHS.items()]


def decode_candidates() -> list[Candidate]:
    return [
        Candidate("plain", layer_decode("plain")),
        Candidate("fused", layer_decode("fused"), True),
    ]


def text_shapes(size: str) -> dict:
    return config_json(size, vision=False, mtp=False)["text_config"]


def scan_case(size: str, tokens: int, seed: int = 0) -> tuple[mx.array, ...]:
    """Scan inputs (as `scan_inputs` makes them) at a size's heads, B = 1, a nonzero state."""
    t = text_shapes(size)
    Hv, Dk, Dv = t["linear_num_value_heads"], t["linear_key_head_dim"], t["linear_value_head_dim"]
    q, k, v, g, beta, state = mx.random.split(mx.random.key(seed), 6)

    def unit(x):
        return x / mx.linalg.norm(x, axis=-1, keepdims=True)

    inputs = (
        unit(mx.random.normal((1, tokens, Hv, Dk), key=q)) * Dk**-0.5,
        unit(mx.random.normal((1, tokens, Hv, Dk), key=k)),
        mx.random.normal((1, tokens, Hv, Dv), key=v),
        -mx.random.uniform(0.01, 2.0, (1, tokens, Hv), key=g),  # log decay
        mx.random.uniform(shape=(1, tokens, Hv), key=beta),
        mx.random.normal((1, Hv, Dv, Dk), key=state) * 0.1,
    )
    mx.eval(inputs)
    return inputs


def decode_case(size: str, dtype: mx.Dtype, seed: int = 0) -> tuple:
    """A DeltaNet layer at a size's heads with random weights in `dtype`, one token and nonzero
    conv and recurrent states. The hidden size is small: the projections around the step cost
    both decode paths the same, and the decode kernel's shapes do not depend on it."""
    shapes = {"text_config": {"hidden_size": DECODE_HIDDEN}}
    config = config_json(size, vision=False, mtp=False, overrides=shapes)
    layer = GatedDeltaNet(ModelConfig.from_hf(config).text)
    keys = iter(mx.random.split(mx.random.key(seed), 64))  # the global seed stays the user's

    def normal(shape, scale=1.0):
        return mx.random.normal(shape, key=next(keys)) * scale

    layer.update(tree_map(lambda p: normal(p.shape, 0.05), layer.parameters()))
    layer.set_dtype(dtype)
    layer.A_log = mx.log(mx.random.uniform(1, 16, (layer.Hv,), key=next(keys)))  # float32
    layer.norm.weight = 1.0 + normal((layer.Dv,), 0.1)
    channels, kernel = layer.conv1d.weight.shape[:2]
    hidden = layer.out_proj.weight.shape[0]
    inputs = (
        layer,
        normal((1, 1, hidden)).astype(dtype),
        normal((1, kernel - 1, channels)).astype(dtype),
        normal((1, layer.Hv, layer.Dv, layer.Dk), 0.1),
    )
    mx.eval(layer.parameters(), inputs[1:])
    return inputs


def relative_error(ours: mx.array, reference: mx.array) -> float:
    """||ours - reference|| / ||reference||, in float32; NaN if either holds a NaN."""
    ours, reference = ours.astype(mx.float32), reference.astype(mx.float32)
    return (mx.linalg.norm(ours - reference) / mx.linalg.norm(reference)).item()


def one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"


def check(candidate: Candidate, cases: list[Case], references: list) -> tuple[str, str]:
    """(status, detail): "ok" or "wrong" with the error nearest its tolerance, or "error"."""
    errors = []  # (relative error, tolerance)
    try:
        for case, reference in zip(cases, references):
            outputs = candidate.run(*case.inputs)
            mx.eval(outputs)
            errors += [(relative_error(o, r), case.tolerance) for o, r in zip(outputs, reference)]
    except Exception as error:  # a kernel that does not compile or launch: any failure counts
        return "error", one_line(error)
    error, tolerance = max(errors, key=lambda e: math.inf if math.isnan(e[0]) else e[0] / e[1])
    if not error <= tolerance:
        return "wrong", f"relative error {error:.1e} > {tolerance:.0e}"
    return "ok", f"relative error {error:.1e} <= {tolerance:.0e}"


def best_time(repeats: int = DEFAULT_REPEATS) -> Timer:
    """The default clock: best wall time of `repeats` evaluations after one warm-up (which
    also compiles a kernel)."""

    def timer(path: str, tokens: int, call: Callable[[], object]) -> float:
        mx.eval(call())
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(call())
            best = min(best, time.perf_counter() - start)
        return best

    return timer


def on_cpu(reference: Callable, cases: list[Case]) -> list:
    """The plain path's outputs, computed on the CPU whatever the default device."""
    with mx.stream(mx.cpu):
        outputs = [reference(*case.inputs) for case in cases]
        mx.eval(outputs)
    return outputs


def time_candidate(candidate: Candidate, result: Result, cases: dict[int, tuple], timer: Timer):
    """Fills `result.seconds`; a failure at some length (correct on small inputs, failing on
    long ones) makes the candidate an error."""
    for T, inputs in cases.items():
        try:
            result.seconds[T] = timer(candidate.name, T, functools.partial(candidate.run, *inputs))
        except Exception as error:
            result.status, result.detail = "error", f"at T={T}: {one_line(error)}"
            result.seconds.clear()
            return


def run_task(
    task: str,
    candidates: Sequence[Candidate],
    cases: list[Case],
    reference: Callable,
    timing_cases: dict[int, tuple],
    metal: bool,
    timer: Timer,
) -> list[Result]:
    """Checks each candidate against `reference` on `cases`, then times the correct ones."""
    references = on_cpu(reference, cases)
    results = []
    for candidate in candidates:
        if candidate.metal and not metal:
            results.append(Result(task, candidate.name, NO_METAL))
            continue
        result = Result(task, candidate.name, *check(candidate, cases, references))
        if result.status == "ok":
            time_candidate(candidate, result, timing_cases, timer)
        results.append(result)
    return results


def self_test(
    scan: Sequence[Candidate],
    decode: Sequence[Candidate],
    *,
    metal: bool,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    timer: Timer | None = None,
) -> list[Result]:
    """Checks every candidate (Metal ones only with `metal`), then times the correct ones: the
    scan paths at each of `tokens`, the decode paths at one token."""
    timer = timer or best_time()
    results = []
    if scan:
        tolerance = TOLERANCE[mx.float32]  # the scan inputs are float32
        checks = [Case(scan_case(size, T), tolerance) for size in CHECK_SIZES for T in CHECK_TOKENS]
        timings = {T: scan_case(TIMING_SIZE, T) for T in tokens}
        results += run_task("scan", scan, checks, recurrent_scan, timings, metal, timer)
    if decode:
        # the plain decode step runs a scan too: the one just chosen, not an untested kernel
        measured = dispatch.machine_tuning()
        dispatch.use_tuning(Tuning(scan_ranges(results, tokens), decode="plain"))
        try:
            checks = [
                Case(decode_case(size, dtype), TOLERANCE[dtype]) for size, dtype in DECODE_CHECKS
            ]
            timings = {1: checks[-1].inputs}  # the 9B heads in bfloat16
            reference = layer_decode("plain")
            results += run_task("decode", decode, checks, reference, timings, metal, timer)
        finally:
            dispatch.use_tuning(measured)
    return results


def fastest(results: list[Result], task: str, tokens: int, fallback: str) -> str:
    timed = {r.path: r.seconds[tokens] for r in results if r.task == task and tokens in r.seconds}
    return min(timed, key=timed.get) if timed else fallback


def scan_ranges(results: list[Result], tokens: Sequence[int]) -> tuple[tuple[int, str], ...]:
    """The fastest correct scan path from each timed length up to the next, the first from one
    token."""
    ranges: list[tuple[int, str]] = []
    for i, T in enumerate(sorted(tokens)):
        path = fastest(results, "scan", T, fallback="recurrent")  # the reference path itself
        if not ranges or ranges[-1][1] != path:
            ranges.append((1 if i == 0 else T, path))
    return tuple(ranges)


def select(results: list[Result], tokens: Sequence[int]) -> Tuning:
    """The scan ranges, the faster correct decode path, and what failed."""
    disabled = tuple((r.path, r.detail) for r in results if r.status in ("wrong", "error"))
    decode = fastest(results, "decode", 1, fallback="plain")
    return Tuning(scan_ranges(results, tokens), decode, disabled)


def warn_disabled(tuning: Tuning) -> None:
    for path, why in tuning.disabled:
        print(
            f"qwen35-mlx: warning: path {path!r} failed its self-test on this machine ({why}) "
            f"and is disabled; `qwen35-mlx doctor` prints the details for a bug report",
            file=sys.stderr,
        )


def load_or_tune(
    scan: Sequence[Candidate],
    decode: Sequence[Candidate],
    *,
    file: Path,
    measured_on: dict[str, str],
    metal: bool,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    timer: Timer | None = None,
) -> Tuning:
    """The tuning cached in `file` for `measured_on`, else measured now and written there."""
    tuning = read_tuning(file, measured_on)
    if tuning is None:
        results = self_test(scan, decode, metal=metal, tokens=tokens, timer=timer)
        tuning = select(results, tokens)
        write_tuning(file, measured_on, tuning, [asdict(r) for r in results])
    warn_disabled(tuning)
    return tuning


@functools.cache  # once per process
def ensure_tuned() -> None:
    """On a Mac, the first time: self-test and time the paths, then the dispatcher uses the
    result. Elsewhere nothing is measured (the CPU keeps its measured rule, `pick_path`)."""
    if not mx.metal.is_available():  # the real machine: tests that pretend Metal skip this
        return
    file, measured_on = cache_file(), machine()
    if read_tuning(file, measured_on) is None:
        print(
            "qwen35-mlx: first run with this chip, macOS, MLX or qwen35-mlx version: testing "
            f"and timing the Metal kernels once (recorded in {file})",
            file=sys.stderr,
        )
    try:
        tuning = load_or_tune(
            scan_candidates(), decode_candidates(), file=file, measured_on=measured_on, metal=True
        )
    except Exception as error:  # a broken self-test must not stop the model from loading
        print(
            f"qwen35-mlx: warning: the kernel self-test failed ({one_line(error)}); the kernels "
            "run untested. `qwen35-mlx doctor` shows the error for a bug report",
            file=sys.stderr,
        )
        return
    dispatch.use_tuning(tuning)


@dataclass
class Report:
    machine: dict[str, str]
    device: str  # MLX's default device during the run
    results: list[Result]
    tuning: Tuning
    tokens: tuple[int, ...]
    recorded_in: Path | None  # None off Metal, where nothing is recorded


def doctor(tokens: Sequence[int] = DEFAULT_TOKENS, repeats: int = DEFAULT_REPEATS) -> Report:
    """Self-tests and times every path now; on a Mac also records the result for the
    dispatcher (replacing the cached one)."""
    if repeats < 1 or not tokens or min(tokens) < 1:
        raise ValueError("--repeats and every --tokens value must be at least 1")
    tokens = tuple(sorted(set(tokens)))
    metal = mx.metal.is_available()
    results = self_test(
        scan_candidates(), decode_candidates(), metal=metal, tokens=tokens, timer=best_time(repeats)
    )
    tuning, file = select(results, tokens), None
    if metal:
        file = cache_file()
        write_tuning(file, machine(), tuning, [asdict(r) for r in results])
        dispatch.use_tuning(tuning)
    return Report(machine(), str(mx.default_device()), results, tuning, tokens, file)
