"""The installed package is whole: a wheel built from the tree carries every module, the Metal
kernel sources the specs read at run time, the chat templates random checkpoints are written
with and the server's chat page (an editable install would hide their absence)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_carries_modules_kernel_sources_and_templates(tmp_path):
    source = tmp_path / "source"  # a clean copy: no egg-info left by an earlier build
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source)
    for package in ("qwen35_mlx", "convert"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "qwen35_mlx"
    expected = {
        f"qwen35_mlx/{f.relative_to(package)}"
        for f in package.rglob("*")
        if f.suffix in (".py", ".metal", ".jinja", ".html", ".css", ".js")
        and "__pycache__" not in f.parts
    }
    expected |= {f"qwen35_mlx/convert/{f.name}" for f in (ROOT / "convert").glob("*.py")}
    assert any(name.endswith(".metal") for name in expected)
    assert {
        "qwen35_mlx/bench/templates/qwen3_5_chat_template_thinking.jinja",
        "qwen35_mlx/bench/templates/qwen3_5_chat_template_nonthinking.jinja",
        "qwen35_mlx/server/static/index.html",  # the chat page
    } <= expected
    assert expected <= shipped, sorted(expected - shipped)
