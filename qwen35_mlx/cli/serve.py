"""Serve a model over HTTP: OpenAI and Anthropic APIs and a chat page (the `server` extra)."""

from __future__ import annotations

import argparse
import inspect
import sys

from .options import add_model_args

SERVER_EXTRA = 'pip install "qwen35-mlx[server]"'


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (401 otherwise)")
    parser.add_argument(
        "--allow-local-files",
        action="store_true",
        help="let requests name image and video files on this machine",
    )
    parser.add_argument(
        "--allow-remote-media",
        action="store_true",
        help="fetch http(s) image URLs (within --max-media-bytes and --fetch-timeout)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=16, help="most requests at once, running or waiting (429)"
    )
    parser.add_argument(
        "--max-batch", type=int, default=8, help="most requests generating at once (batched)"
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=32 << 20, help="largest request body (413)"
    )
    parser.add_argument("--max-images", type=int, default=8, help="most images per request")
    parser.add_argument(
        "--max-media-bytes", type=int, default=20 << 20, help="largest fetched image"
    )
    parser.add_argument(
        "--fetch-timeout", type=float, default=10.0, help="seconds to fetch one image"
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=32768,
        help="most tokens a request may ask for (and its default)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        from ..server.run import serve
    except ImportError as error:
        print(
            f"qwen35-mlx serve needs the server extra ({error.name} is missing): {SERVER_EXTRA}",
            file=sys.stderr,
        )
        return 2
    serve(**{name: getattr(args, name) for name in inspect.signature(serve).parameters})
    return 0
