"""Generate a reply to one prompt, streaming it to the terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..generate import stream_generate
from ..loading import load
from ..progress import progress_kwargs
from .options import (
    add_generation_args,
    add_media_args,
    add_model_args,
    draft_model_kwargs,
    generation_kwargs,
    load_kwargs,
    media_kwargs,
)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--prompt", required=True, help="the user message ('-' reads stdin)")
    parser.add_argument("--system-prompt", help="a system message before the prompt")
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="feed the prompt text as is, without the chat template",
    )
    add_media_args(parser)
    add_generation_args(parser)


def main(args: argparse.Namespace) -> int:
    media = media_kwargs(args)
    if args.ignore_chat_template and any(media.values()):
        raise ValueError(
            "--image and --video are placed by the chat template; drop --ignore-chat-template"
        )
    model, tokenizer = load(args.model, **load_kwargs(args))
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.ignore_chat_template:
        prompt = text
    else:
        prompt = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        prompt.append({"role": "user", "content": text})
    bar = progress_kwargs(args.progress, args.prefill_step_size)
    drafting = draft_model_kwargs(args)
    print_stream(
        stream_generate(
            model, tokenizer, prompt, **media, **generation_kwargs(args), **drafting, **bar
        )
    )
    return 0


def print_stream(responses, stopped: Callable[[], bool] = lambda: False) -> None:
    """Print reasoning inside <think> tags, then the answer, then statistics on stderr; stop
    reading `responses` (and close them) as soon as `stopped()` says so."""
    thinking = False
    last = None
    for last in responses:
        if last.reasoning != thinking:
            print("<think>\n" if last.reasoning else "\n</think>\n\n", end="")
            thinking = last.reasoning
        print(last.text, end="", flush=True)
        if stopped():
            responses.close()
            print(" [stopped]", end="")
            break
    if thinking:
        print("\n</think>", end="")
    print()
    if last is not None:
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.2f} tokens/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.2f} tokens/s | "
            f"peak memory: {last.peak_memory:.2f} GB | finish: {last.finish_reason}",
            file=sys.stderr,
        )
        if last.speculative is not None:
            print(f"speculative: {last.speculative.summary()}", file=sys.stderr)
