"""The examples run over the public API against a tiny checkpoint and produce tokens."""

import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from checkpoints import Spec

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture
def run_example(monkeypatch, capsys):
    """run_example(name, *arguments) -> stdout: the script run as `python examples/NAME ...`
    (in this process: a fresh interpreter would spend seconds importing MLX each time)."""

    def run(name: str, *arguments) -> str:
        path = EXAMPLES / name
        monkeypatch.setattr(sys, "argv", [str(path), *map(str, arguments)])
        runpy.run_path(str(path), run_name="__main__")
        return capsys.readouterr().out

    return run


def generated_tokens(stdout: str) -> int:
    return int(re.search(r"\((\d+) tokens", stdout).group(1))


def test_stream_answer_example(make_checkpoint, run_example):
    directory, _ = make_checkpoint(Spec(thinking_by_default=True))
    stdout = run_example(
        "stream_answer.py", "--model", directory, "--max-tokens", 12, "What is MLX?"
    )
    assert "[thinking]" in stdout  # the 4B/9B-style template thinks by default
    assert 1 <= generated_tokens(stdout) <= 12


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two PNGs and a 4-frame GIF of noise."""
    folder = tmp_path_factory.mktemp("example-media")
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for _ in range(4)]
    frames[0].save(folder / "a.png")
    frames[1].save(folder / "b.png")
    frames[0].save(folder / "clip.gif", save_all=True, append_images=frames[1:], duration=250)
    return folder


VISION_EXAMPLES = {
    "image_qa.py": ["a.png", "What is this?"],
    "compare_images.py": ["a.png", "b.png"],
    "read_document.py": ["a.png", "--max-pixels", 65536],
    "video_qa.py": ["clip.gif", "What happens?", "--fps", 4],
    "stream_answer.py": ["--image", "a.png", "What is in the picture?"],
}


@pytest.mark.parametrize("name, arguments", VISION_EXAMPLES.items(), ids=list(VISION_EXAMPLES))
def test_vision_examples(make_checkpoint, run_example, media, name, arguments):
    directory, _ = make_checkpoint(Spec(layout="conditional"))
    arguments = [media / a if str(a).endswith((".png", ".gif")) else a for a in arguments]
    stdout = run_example(name, "--model", directory, "--max-tokens", 8, *arguments)
    assert 1 <= generated_tokens(stdout) <= 8
