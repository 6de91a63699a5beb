"""Upload a converted checkpoint to the Hugging Face hub, once it loads: its own files only."""

from __future__ import annotations

import argparse

from ..convert import upload


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--path",
        required=True,
        help="the converted checkpoint directory (its config, weights, "
        "tokenizer, processor and template files and model card are "
        "uploaded, nothing else)",
    )
    parser.add_argument("--upload-repo", required=True, help="Hugging Face repo id (owner/name)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")


def main(args: argparse.Namespace) -> int:
    upload(args.path, args.upload_repo, private=args.private)
    return 0
