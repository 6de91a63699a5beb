"""Start a server: load the model, start the engine, serve the app with uvicorn."""

from __future__ import annotations

import logging
import socket
import threading
import time
import warnings
from collections.abc import Callable

import uvicorn

from ..loading import load
from .app import Server, create_app
from .engine import Engine
from .media import MediaPolicy

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    allow_local_files: bool = False,
    allow_remote_media: bool = False,
    max_queue: int = 16,
    max_batch: int = 8,
    max_body_bytes: int = 32 << 20,
    max_images: int = 8,
    max_media_bytes: int = 20 << 20,
    fetch_timeout: float = 10.0,
    max_tokens_limit: int = 32768,
    dtype: str | None = None,
) -> None:
    """Serve `model` (a checkpoint directory or Hugging Face repo id) until interrupted.

    Args:
        host, port: where to listen; loopback by default (other hosts get a warning).
        api_key: clients must send `Authorization: Bearer <api_key>` (401 otherwise).
        allow_local_files: let requests name image and video files on this machine.
        allow_remote_media: fetch http(s) image URLs, each within max_media_bytes and
            fetch_timeout seconds.
        max_queue: most requests accepted at once (running or waiting); more get 429.
        max_batch: most requests generating at once, batched in one decode step.
        max_body_bytes: largest request body (413 beyond).
        max_images: most images and videos per request.
        max_tokens_limit: most tokens a request may ask for (and what it gets by default).
        dtype: weight dtype (default: the checkpoint's).
    """
    if host not in LOOPBACK:
        warnings.warn(
            f"serving on {host}: other machines can reach this server"
            + ("" if api_key else "; set --api-key to keep them out"),
            stacklevel=2,
        )
    engine = Engine(*load(model, dtype=dtype), max_queue=max_queue, max_batch=max_batch).start()
    media = MediaPolicy(
        allow_local_files=allow_local_files,
        allow_remote_media=allow_remote_media,
        max_images=max_images,
        max_media_bytes=max_media_bytes,
        fetch_timeout=fetch_timeout,
    )
    server = Server(
        engine,
        model_id=model,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit,
        media=media,
    )
    logging.basicConfig(level=logging.INFO)
    try:
        uvicorn.run(create_app(server), host=host, port=port)
    finally:
        engine.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> tuple[int, Callable[[], None]]:
    """Serve `app` on a daemon thread (for tests and benchmarks): (the port, a function that
    stops it). Port 0 picks a free one."""
    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join()

    return port, stop
