"""The examples run over the public API against a tiny checkpoint and produce tokens."""

import re
import subprocess
import sys
from pathlib import Path

from checkpoints import Spec

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_stream_answer_example(make_checkpoint):
    directory, _ = make_checkpoint(Spec(thinking_by_default=True))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "stream_answer.py"), "--model", str(directory),
         "--max-tokens", "12", "What is MLX?"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[thinking]" in result.stdout  # the 4B/9B-style template thinks by default
    tokens = int(re.search(r"\((\d+) tokens", result.stdout).group(1))
    assert 1 <= tokens <= 12
