"""The README's shell commands work as written, so the README cannot drift from the code.

Every ```sh block is read from README.md. Runnable commands run in a shell as a newcomer would
type them, changed only to stay offline and quick: set-up steps (virtual environments, pip
install, the test suite itself) are left out, the hub repo id is swapped for a small local random
checkpoint, /tmp/ paths move into the test's folder, generation is cut to a few tokens and
`bench make-checkpoint` writes 4 decoder layers instead of the size's full depth. A usage block
(`[--flag ...]` placeholders) is checked against the command line itself: each command it shows
exists and accepts every flag it names.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench import TINY_TEXT, TINY_VISION

from qwen35_mlx import cli
from qwen35_mlx.bench.random_checkpoint import write_random_checkpoint

README = Path(__file__).parent.parent / "README.md"
HUB_REPO = "Qwen/Qwen3.5-0.8B"
SET_UP = (
    "apt-get install",
    "python3 -m venv",
    ". .venv/bin/activate",
    "pip install",
    "python -m pytest",
)
MAX_TOKENS = "2"
# As after `. .venv/bin/activate`: this interpreter's scripts (qwen35-mlx) come first on PATH.
ACTIVATED = {
    **os.environ,
    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
}
# A stand-in for the hub model: the released vocabulary and tokenizer, a tiny decoder.
HUB_STAND_IN = {
    "text_config": {**TINY_TEXT, "linear_num_value_heads": 2},
    "vision_config": TINY_VISION,
}


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def commands(block: str) -> list[str]:
    """The block's commands: indented lines continue the one above, `&&` chains are split."""
    lines: list[str] = []
    for line in block.splitlines():
        if line.lstrip().startswith("#"):  # a comment
            continue
        if line[:1].isspace() and lines:
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line.strip())
    return [part.strip() for line in lines for part in line.split(" && ")]


def is_usage(command: str) -> bool:
    """A usage synopsis, not a command to run (its block is one as a whole)."""
    return "[--" in command


def is_set_up(command: str) -> bool:
    return command.startswith(SET_UP)


BLOCKS = [commands(block) for block in sh_blocks(README.read_text(encoding="utf-8"))]
RUNNABLE = [
    run
    for block in BLOCKS
    if not any(is_usage(c) for c in block)
    if (run := [c for c in block if not is_set_up(c)])
]
USAGE = [c for block in BLOCKS if any(is_usage(c) for c in block) for c in block]


def as_run_here(command: str, checkpoint: Path, tmp_path: Path) -> str:
    """The command with the hub id swapped for `checkpoint`, /tmp/ moved into `tmp_path`, few
    tokens generated and few layers written."""
    command = command.replace("/tmp/", f"{tmp_path}/").replace(HUB_REPO, str(checkpoint))
    if " generate " in f" {command} ":
        command = re.sub(r"--max-tokens \d+", "", command) + f" --max-tokens {MAX_TOKENS}"
    if "bench make-checkpoint" in command:
        command += " --num-layers 4"
    return command


def test_the_readme_is_read_as_expected():
    # Guards the parsing: an unrecognised README would make the other tests vacuous.
    assert len(BLOCKS) >= 4
    runnable = [c for block in RUNNABLE for c in block]
    assert any("bench make-checkpoint" in c for c in runnable)
    assert sum(c.startswith("qwen35-mlx generate") for c in runnable) >= 2
    assert any(c.startswith("qwen35-mlx bench startup") for c in USAGE)
    assert any(c.startswith("python -m benchmarks.kernels") for c in USAGE)
    assert all(c.startswith(("qwen35-mlx ", "python -m benchmarks.")) for c in runnable + USAGE)


@pytest.fixture(scope="module")
def hub_stand_in(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("readme") / "qwen35-tiny"
    return write_random_checkpoint(directory, num_layers=4, overrides=HUB_STAND_IN)


@pytest.mark.parametrize("block", RUNNABLE, ids=[block[0][:48] for block in RUNNABLE])
def test_commands_run(block, hub_stand_in, tmp_path):
    for command in block:
        command = as_run_here(command, hub_stand_in, tmp_path)
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=ACTIVATED,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"


def subcommand(command: str) -> list[str]:
    """`qwen35-mlx bench generate --model DIR ...` -> ["bench", "generate"];
    `python -m benchmarks.kernels ...` -> ["benchmarks.kernels"]."""
    words = shlex.split(command, comments=True)[1:]
    if words[:1] == ["-m"]:
        return words[1:2]
    return [w for w in words[: next(i for i, w in enumerate(words + ["-"]) if w[0] in "-[")]]


def main_of(command: str):
    """The `main(argv)` a usage line runs: the qwen35-mlx command or a benchmark module."""
    if command.startswith("python -m "):
        return importlib.import_module(subcommand(command)[0]).main, []
    return cli.main, subcommand(command)


@pytest.mark.parametrize("command", USAGE, ids=[" ".join(subcommand(c)) for c in USAGE])
def test_usage_lines_name_real_commands_and_flags(command, capsys):
    main, words = main_of(command)
    with pytest.raises(SystemExit) as exited:
        main([*words, "--help"])
    assert exited.value.code == 0
    accepted = flags(capsys.readouterr().out)
    shown = flags(command.split("#")[0])
    assert shown, command
    assert sorted(shown - accepted) == [], command


def flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
