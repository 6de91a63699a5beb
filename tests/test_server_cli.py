"""`qwen35-mlx serve`: each flag maps onto a keyword of `serve`, a missing `server` extra is a
clear message, the core install does not import the server's dependencies, and a host other
than loopback is warned about."""

import inspect
import subprocess
import sys
import warnings
from unittest.mock import create_autospec

import pytest

from qwen35_mlx.cli import main
from qwen35_mlx.server import run

from checkpoints import Spec


def test_every_serve_flag_maps_to_a_keyword(monkeypatch):
    fake = create_autospec(run.serve)
    monkeypatch.setattr(run, "serve", fake)
    flags = [
        "--model", "m", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
        "--allow-local-files", "--allow-remote-media", "--max-queue", "3", "--max-batch", "2",
        "--max-body-bytes", "1000", "--max-images", "2", "--max-media-bytes", "500",
        "--fetch-timeout", "2.5", "--max-tokens-limit", "64", "--dtype", "float32",
    ]  # fmt: skip
    assert main(["serve", *flags]) == 0
    expected = {
        "model": "m",
        "host": "0.0.0.0",
        "port": 9000,
        "api_key": "k",
        "allow_local_files": True,
        "allow_remote_media": True,
        "max_queue": 3,
        "max_batch": 2,
        "max_body_bytes": 1000,
        "max_images": 2,
        "max_media_bytes": 500,
        "fetch_timeout": 2.5,
        "max_tokens_limit": 64,
        "dtype": "float32",
    }
    assert set(expected) == set(inspect.signature(run.serve).parameters)
    fake.assert_called_once_with(**expected)


def test_a_missing_server_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "qwen35_mlx.server.run")
    assert main(["serve", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "qwen35-mlx[server]"' in err and "uvicorn" in err


def test_the_core_does_not_import_the_server_dependencies():
    code = (
        "import sys, qwen35_mlx, qwen35_mlx.cli\n"
        "print(sorted(m for m in ('starlette', 'uvicorn', 'pydantic') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr


def test_other_hosts_than_loopback_are_warned_about(make_checkpoint, monkeypatch):
    directory, _ = make_checkpoint(Spec())
    uvicorn_run = create_autospec(run.uvicorn.run)
    monkeypatch.setattr(run.uvicorn, "run", uvicorn_run)
    with pytest.warns(UserWarning, match="other machines can reach.*--api-key"):
        run.serve(str(directory), host="0.0.0.0")
    assert uvicorn_run.call_args.kwargs == {"host": "0.0.0.0", "port": 8080}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loopback: no warning
        run.serve(str(directory))
    assert uvicorn_run.call_args.kwargs["host"] == "127.0.0.1"


def test_bench_serve_reports_reuse_against_none(make_checkpoint, capsys):
    directory, _ = make_checkpoint(Spec())
    assert main(["bench", "serve", "--model", str(directory), "--history", "64"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip()[:1].isdigit()).split()
    history, cached = int(row[0]), int(row[1])
    assert 64 < cached < history  # the document's snapshot reused, the new question not


def test_a_process_that_served_requests_exits_cleanly(make_checkpoint):
    """The engine thread frees its MLX streams when it ends: without that MLX aborted the
    process at exit (exit code 134, "terminate called without an active exception")."""
    directory, _ = make_checkpoint(Spec())
    cli = "import sys; from qwen35_mlx.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", cli, "bench", "batch", "--model"]
    for _ in range(4):  # the abort came at most exits, not all
        done = subprocess.run(
            [*command, str(directory), "--clients", "1", "2", "4", "--tokens", "16", "--http"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate" not in done.stderr
