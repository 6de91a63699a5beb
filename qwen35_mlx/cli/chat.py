"""Chat with a model in the terminal: Ctrl-C stops a reply (the conversation goes on), a
second Ctrl-C or Ctrl-D quits."""

from __future__ import annotations

import argparse
import functools
import signal

from ..chat import ChatSession
from ..loading import load
from ..progress import progress_kwargs
from ..prompt_cache import PrefixCache
from .generate import print_stream
from .options import (
    add_generation_args,
    add_media_args,
    add_model_args,
    draft_model_kwargs,
    generation_kwargs,
    load_kwargs,
    media_kwargs,
)

HELP = (
    "Type a message. Commands: /image PATH, /video PATH (show it with your next message), "
    "/undo (take back your last message), /retry (a new reply to it), /reset (new "
    "conversation), /quit (or Ctrl-D). Ctrl-C stops a reply."
)
ATTACH = {"/image": "images", "/video": "videos"}


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--system-prompt", help="a system message for the conversation")
    add_media_args(parser, chat=True)
    parser.add_argument(
        "--prompt-cache-dir",
        metavar="DIR",
        help="keep the conversation's cached prefixes in this folder too, so "
        "that a long document conversation resumes at once in a later "
        "run (PrefixCache(directory=DIR))",
    )
    parser.epilog = HELP
    add_generation_args(parser)


class ReplyInterrupt:
    """While a reply streams, the first Ctrl-C asks it to stop after the current token (the
    turn ends cleanly, with what was said so far) and a second one quits."""

    def __init__(self):
        self.requested = False

    def __enter__(self) -> ReplyInterrupt:
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def main(args: argparse.Namespace) -> int:
    try:
        return converse(args)
    except KeyboardInterrupt:  # at the prompt, or a second Ctrl-C during a reply
        print("\n(bye)")
        return 0


def converse(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model, **load_kwargs(args))
    session = ChatSession(
        model,
        tokenizer,
        system_prompt=args.system_prompt,
        prompt_cache=PrefixCache(directory=args.prompt_cache_dir),
        **generation_kwargs(args),
        **draft_model_kwargs(args),
        **progress_kwargs(args.progress, args.prefill_step_size),
    )
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
        elif message == "/undo":
            removed = session.undo()
            print("(nothing to undo)" if removed is None else "(took back your last message)")
        elif message == "/retry":
            stream(session.retry)
        elif command in ATTACH and argument.strip():
            attached[ATTACH[command]].append(argument.strip())
            print(f"({command[1:]} {argument.strip()} goes with your next message)")
        elif command in ATTACH:
            print(f"(usage: {command} PATH)")
        elif message:
            stream(functools.partial(session.send, message, **attached))
            attached = {name: [] for name in attached}


def stream(reply) -> None:
    """Print the reply `reply()` streams; Ctrl-C stops it, an error is printed, not raised."""
    try:
        with ReplyInterrupt() as interrupt:
            print_stream(reply(), lambda: interrupt.requested)
    except (ValueError, OSError) as error:  # a bad file: say so and keep chatting
        print(f"error: {error}")
