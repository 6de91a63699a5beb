"""Chat with a model in the terminal; the cache is kept between turns."""

from __future__ import annotations

import argparse

from ..chat import ChatSession
from ..loading import load
from .generate import print_stream
from .options import add_generation_args, add_model_args, generation_kwargs

HELP = "Type a message. Commands: /reset (new conversation), /quit (or Ctrl-D)."


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--system-prompt", help="a system message for the conversation")
    add_generation_args(parser)


def main(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model, dtype=args.dtype)
    session = ChatSession(model, tokenizer, system_prompt=args.system_prompt,
                          **generation_kwargs(args))
    print(HELP)
    while True:
        try:
            message = input(">> ").strip()
        except EOFError:
            print()
            return 0
        if message == "/quit":
            return 0
        if message == "/reset":
            session.reset()
            print("(new conversation)")
        elif message:
            print_stream(session.send(message))
