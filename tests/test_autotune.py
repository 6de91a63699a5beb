"""The self-test and autotune (docs/ARCHITECTURE.md §8.1): injected failing and wrong kernels
are disabled, injected timings decide the path per length range, the choice is cached per
machine and read back by the dispatcher, and `qwen35-mlx doctor` prints its table here."""

import argparse
import inspect
import json
import re

import mlx.core as mx
import pytest

from qwen35_mlx.cli import doctor as doctor_command
from qwen35_mlx.cli import main as cli_main
from qwen35_mlx.gated_delta import SCAN_PATHS, autotune, dispatch
from qwen35_mlx.gated_delta.autotune import NO_METAL, Candidate, Result, layer_decode, load_or_tune
from qwen35_mlx.gated_delta.chunked import chunked_scan
from qwen35_mlx.gated_delta.kernel import KernelSpec
from qwen35_mlx.gated_delta.recurrent import recurrent_scan
from qwen35_mlx.gated_delta.tuning import (
    CACHE_DIR_ENV,
    Tuning,
    cache_file,
    machine,
    read_tuning,
    write_tuning,
)

from msl_emulator import run_on_emulator

TOKENS = (1, 16, 256)
MACHINE = {
    "chip": "Apple M9 (applegpu_g99)",
    "os": "macOS 99.0",
    "mlx": "0.32.4",
    "qwen35-mlx": "1.0",
}


def raising(*inputs):
    raise RuntimeError("Unable to build metal library from source\nerror: use of undeclared x")


def perturbed(*inputs):
    out, state = recurrent_scan(*inputs)
    return out * (1 + 1e-3), state  # relative error 1e-3: ten times the scan's tolerance


class FakeClock:
    """Seconds per (path, tokens) from a table; records what it was asked to time."""

    def __init__(self, seconds: dict[tuple[str, int], float]):
        self.seconds, self.timed = seconds, []

    def __call__(self, path, tokens, call):
        self.timed.append((path, tokens))
        return self.seconds[path, tokens]


def clock(**per_path) -> FakeClock:
    """FakeClock(path=(s at T=1, s at 16, s at 256)); decode paths at T=1 only."""
    return FakeClock(
        {(path, T): s for path, times in per_path.items() for T, s in zip(TOKENS, times)}
    )


@pytest.fixture
def rigged():
    """Our two plain paths, a Metal kernel that fails to compile, and one that is wrong; the
    two bad ones would be the fastest if they were timed."""
    return [
        Candidate("recurrent", recurrent_scan),
        Candidate("chunked", chunked_scan),
        Candidate("metal_chunked", raising, metal=True),
        Candidate("mx_fast", perturbed, metal=True),
    ]


FAST_BAD = dict(metal_chunked=(1e-9,) * 3, mx_fast=(1e-9,) * 3)


def test_broken_kernels_are_disabled_and_the_fastest_correct_path_wins_each_range(
    rigged, capsys, tmp_path
):
    timer = clock(recurrent=(1.0, 5.0, 9.0), chunked=(2.0, 4.0, 3.0), **FAST_BAD)
    tuning = load_or_tune(
        rigged,
        [],
        file=tmp_path / "autotune.json",
        measured_on=MACHINE,
        metal=True,
        tokens=TOKENS,
        timer=timer,
    )
    assert tuning.scan == ((1, "recurrent"), (16, "chunked"))
    assert [tuning.scan_path(T) for T in (1, 15, 16, 255, 256, 10**6)] == [
        "recurrent",
        "recurrent",
        "chunked",
        "chunked",
        "chunked",
        "chunked",
    ]
    assert tuning.decode == "plain"  # no decode candidate: the plain ops
    disabled = dict(tuning.disabled)
    assert set(disabled) == {"metal_chunked", "mx_fast"}
    assert disabled["metal_chunked"].startswith("RuntimeError: Unable to build metal library")
    assert re.fullmatch(r"relative error 1\.0e-03 > 1e-04", disabled["mx_fast"])
    assert {path for path, _ in timer.timed} == {"recurrent", "chunked"}  # bad ones never timed
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("qwen35-mlx: warning: path") for w in warnings)
    assert "'metal_chunked' failed its self-test" in warnings[0]


def test_adjacent_ranges_with_one_winner_merge_and_a_later_winner_returns():
    candidates = [Candidate("recurrent", recurrent_scan), Candidate("chunked", chunked_scan)]
    results = autotune.self_test(
        candidates,
        [],
        metal=False,
        tokens=TOKENS,
        timer=clock(recurrent=(1.0, 5.0, 1.0), chunked=(2.0, 4.0, 3.0)),
    )
    assert [r.status for r in results] == ["ok", "ok"]
    tuning = autotune.select(results, TOKENS)
    assert tuning.scan == ((1, "recurrent"), (16, "chunked"), (256, "recurrent"))
    assert tuning.disabled == ()


def test_metal_candidates_are_neither_run_nor_timed_without_metal(rigged):
    timer = clock(recurrent=(1.0, 1.0, 1.0), chunked=(2.0, 2.0, 2.0))
    results = autotune.self_test(rigged, [], metal=False, tokens=TOKENS, timer=timer)
    status = {r.path: r.status for r in results}
    assert status == {
        "recurrent": "ok",
        "chunked": "ok",
        "metal_chunked": NO_METAL,  # the raising kernel was not called
        "mx_fast": NO_METAL,
    }
    assert autotune.select(results, TOKENS).disabled == ()


def test_the_cached_choice_is_reused_without_timing(rigged, tmp_path):
    file = tmp_path / "cache" / "autotune.json"
    first = clock(recurrent=(1.0, 5.0, 9.0), chunked=(2.0, 4.0, 3.0), **FAST_BAD)
    tuned = load_or_tune(
        rigged, [], file=file, measured_on=MACHINE, metal=True, tokens=TOKENS, timer=first
    )
    record = json.loads(file.read_text())
    assert record["machine"] == MACHINE
    assert {row["path"]: row["status"] for row in record["results"]}["mx_fast"] == "wrong"

    again = FakeClock({})  # any timing would raise KeyError
    never = [Candidate(c.name, raising, c.metal) for c in rigged]  # nor any check
    reused = load_or_tune(
        never, [], file=file, measured_on=MACHINE, metal=True, tokens=TOKENS, timer=again
    )
    assert reused == tuned and again.timed == []


def foreign(**changes):
    return lambda record: {**record, "machine": {**record["machine"], **changes}}


def replaced(key, value):
    return lambda record: {**record, key: value}


STALE = {
    "another MLX": foreign(mlx="0.31.0"),
    "another package version": foreign(**{"qwen35-mlx": "0.9"}),
    "another chip": foreign(chip="Apple M1 (applegpu_g13g)"),
    "another macOS": foreign(os="macOS 14.0"),
    "another file format": replaced("format", 0),
    "a tuning without a first range": replaced("tuning", {"scan": [], "decode": "plain"}),
}


@pytest.mark.parametrize("stale", [*STALE, "not JSON", "truncated"])
def test_a_corrupt_or_foreign_cache_is_measured_again_and_rewritten(rigged, tmp_path, stale):
    file = tmp_path / "autotune.json"
    write_tuning(file, MACHINE, Tuning(((1, "recurrent"),), "plain"), [])
    text = file.read_text()
    assert read_tuning(file, MACHINE) is not None  # valid as written
    if stale == "not JSON":
        file.write_text("\x00garbage")
    elif stale == "truncated":
        file.write_text(text[: len(text) // 2])
    else:
        file.write_text(json.dumps(STALE[stale](json.loads(text))))
    timer = clock(recurrent=(2.0, 2.0, 2.0), chunked=(1.0, 1.0, 1.0))
    plain = rigged[:2]
    tuning = load_or_tune(
        plain, [], file=file, measured_on=MACHINE, metal=True, tokens=TOKENS, timer=timer
    )
    assert tuning.scan == ((1, "chunked"),) and timer.timed  # measured, not read
    assert read_tuning(file, MACHINE) == tuning  # rewritten for this machine


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    """The cache in a temporary folder; the dispatcher reads it afresh before and after."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    dispatch.use_tuning(None)
    yield tmp_path
    dispatch.use_tuning(None)


def test_the_dispatcher_follows_the_recorded_choice(cache_dir, monkeypatch):
    assert cache_file() == cache_dir / "autotune.json"
    load_or_tune(
        [Candidate("recurrent", recurrent_scan), Candidate("mx_fast", SCAN_PATHS["mx_fast"])],
        [],
        file=cache_file(),
        measured_on=machine(),
        metal=True,
        tokens=TOKENS,
        timer=clock(recurrent=(1.0, 5.0, 9.0), mx_fast=(2.0, 4.0, 3.0)),
    )
    monkeypatch.setattr(dispatch, "metal_ready", lambda: True)
    assert [dispatch.pick_path(T) for T in (1, 15, 16, 4096)] == ["recurrent"] * 2 + ["mx_fast"] * 2
    assert not dispatch.use_fused_decode(1)  # no fused step was measured: the plain ops


def test_without_a_record_the_kernels_as_designed_are_used(cache_dir, monkeypatch):
    monkeypatch.setattr(dispatch, "metal_ready", lambda: True)
    assert dispatch.pick_path(1) == dispatch.pick_path(4096) == "metal_chunked"
    assert dispatch.use_fused_decode(1)


def test_the_decode_kernel_is_kept_only_when_correct_and_faster():
    def five_percent_off(layer, x, conv_state, state):
        out, conv_state, state = layer_decode("plain")(layer, x, conv_state, state)
        return out * 1.05, conv_state, state

    results = autotune.self_test(
        [],
        [
            Candidate("plain", layer_decode("plain")),
            Candidate("fused", layer_decode("plain"), metal=True),  # a correct stand-in
            Candidate("fails", raising, metal=True),
            Candidate("wrong", five_percent_off, metal=True),
        ],
        metal=True,
        tokens=TOKENS,
        timer=FakeClock({("plain", 1): 2.0, ("fused", 1): 1.0}),
    )
    assert {r.path: r.status for r in results} == {
        "plain": "ok",
        "fused": "ok",
        "fails": "error",
        "wrong": "wrong",
    }
    assert autotune.select(results, TOKENS).decode == "fused"  # correct and faster
    slower = [r for r in results if r.path != "fused"] + [
        Result("decode", "fused", "ok", seconds={1: 3.0})
    ]
    assert autotune.select(slower, TOKENS).decode == "plain"
    without = [r for r in results if r.path != "fused"]
    assert autotune.select(without, TOKENS).decode == "plain"  # the bad ones never win


def test_our_kernels_pass_the_self_test_on_the_emulator(monkeypatch):
    """The self-test's real Metal candidates at its real shapes, each kernel call run by the
    MSL-on-CPU emulator as a Mac's GPU would run it: both kernels are found correct (a kernel
    that refused these launches would be disabled on every Mac)."""
    monkeypatch.setattr(KernelSpec, "run", run_on_emulator)
    tables = (autotune.scan_candidates(), autotune.decode_candidates())
    metal_only = [[c for c in table if c.metal] for table in tables]
    assert [[c.name for c in table] for table in metal_only] == [["metal_chunked"], ["fused"]]
    results = autotune.self_test(*metal_only, metal=True, tokens=(1,), timer=clock_at_one)
    assert [(r.path, r.status) for r in results] == [("metal_chunked", "ok"), ("fused", "ok")]


def clock_at_one(path, tokens, call):
    return 1.0


def test_doctor_prints_a_table_and_records_nothing_without_metal(cache_dir, capsys):
    assert cli_main(["doctor", "--tokens", "8", "1", "--repeats", "1"]) == 0
    header, columns, *lines = capsys.readouterr().out.splitlines()
    assert f"MLX {mx.__version__}" in header and f"qwen35-mlx {machine()['qwen35-mlx']}" in header
    assert f"chip: {machine()['chip']}" in header
    assert re.split(r"\s{2,}", columns) == ["task", "path", "correct", "T=1 ms", "T=8 ms"]
    rows = {}
    for line in lines[:6]:
        task, path, correct, *ms = re.split(r"\s{2,}", line.strip())
        rows[task, path] = correct, ms
    metal = {("scan", "metal_chunked"), ("decode", "fused")}
    assert set(rows) == {("scan", p) for p in SCAN_PATHS} | {("decode", "plain")} | metal
    for key, (correct, ms) in rows.items():
        if key in metal:
            assert correct == NO_METAL and set(ms) == {"-"}
        else:  # decode is timed at one token only
            assert correct.startswith("yes (relative error")
            assert len(ms) == (2 if key[0] == "scan" else 1) and all(float(t) > 0 for t in ms)
    assert lines[6].startswith("fastest correct: scan ")
    assert lines[7].startswith("not recorded: no Metal here")
    assert not cache_file().exists()


def test_doctor_refuses_bad_lengths(capsys):
    assert cli_main(["doctor", "--tokens", "0"]) == 2
    assert "--tokens value must be at least 1" in capsys.readouterr().err


def test_doctor_flags_are_the_api_keywords():
    parser = argparse.ArgumentParser()
    doctor_command.add_args(parser)
    flags = {action.dest for action in parser._actions} - {"help"}
    assert flags == set(inspect.signature(autotune.doctor).parameters) == {"tokens", "repeats"}
    defaults = parser.parse_args([])
    assert tuple(defaults.tokens) == autotune.DEFAULT_TOKENS
    assert defaults.repeats == autotune.DEFAULT_REPEATS


def test_a_path_failing_at_a_timed_length_is_disabled():
    def timer(path, tokens, call):
        if (path, tokens) == ("chunked", 256):
            raise RuntimeError("[metal::malloc] Attempting to allocate more than the maximum")
        return {"recurrent": 2.0, "chunked": 1.0}[path]

    candidates = [Candidate("recurrent", recurrent_scan), Candidate("chunked", chunked_scan)]
    results = autotune.self_test(candidates, [], metal=False, tokens=TOKENS, timer=timer)
    chunked = results[1]
    assert chunked.status == "error" and chunked.seconds == {}
    assert chunked.detail == (
        "at T=256: RuntimeError: [metal::malloc] Attempting to allocate more than the maximum"
    )
    assert autotune.select(results, TOKENS).scan == ((1, "recurrent"),)
