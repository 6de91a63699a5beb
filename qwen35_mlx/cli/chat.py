"""Chat with a model in the terminal; the cache is kept between turns."""

from __future__ import annotations

import argparse

from ..chat import ChatSession
from ..loading import load
from .generate import print_stream
from .options import (add_generation_args, add_media_args, add_model_args, generation_kwargs,
                      load_kwargs, media_kwargs)

HELP = ("Type a message. Commands: /image PATH, /video PATH (show it with your next message), "
        "/reset (new conversation), /quit (or Ctrl-D).")
ATTACH = {"/image": "images", "/video": "videos"}


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--system-prompt", help="a system message for the conversation")
    add_media_args(parser, chat=True)
    parser.epilog = HELP
    add_generation_args(parser)


def main(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model, **load_kwargs(args))
    session = ChatSession(model, tokenizer, system_prompt=args.system_prompt,
                          **generation_kwargs(args))
    attached = {name: list(paths or []) for name, paths in media_kwargs(args).items()}
    print(HELP)
    while True:
        try:
            message = input(">> ").strip()
        except EOFError:
            print()
            return 0
        command, _, argument = message.partition(" ")
        if message == "/quit":
            return 0
        if message == "/reset":
            session.reset()
            print("(new conversation)")
        elif command in ATTACH and argument.strip():
            attached[ATTACH[command]].append(argument.strip())
            print(f"({command[1:]} {argument.strip()} goes with your next message)")
        elif command in ATTACH:
            print(f"(usage: {command} PATH)")
        elif message:
            try:
                print_stream(session.send(message, **attached))
            except (ValueError, OSError) as error:  # a bad file: say so and keep chatting
                print(f"error: {error}")
            attached = {name: [] for name in attached}
