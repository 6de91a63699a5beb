"""The `qwen35-mlx` command. Each subcommand is a module with `add_args(parser)` and
`main(args)`, and its docstring is the help users see."""

from __future__ import annotations

import argparse
import sys

from . import bench, chat, convert, doctor, generate, perplexity, plan, serve, upload

COMMANDS = {
    "generate": generate,
    "chat": chat,
    "convert": convert,
    "upload": upload,
    "bench": bench,
    "perplexity": perplexity,
    "plan": plan,
    "serve": serve,
    "doctor": doctor,
}


DESCRIPTION = """\
Run Alibaba's Qwen3.5 models (0.8B, 2B, 4B, 9B) on Apple Silicon with MLX: generate and chat
(text, images, video), score text, convert and upload quantized checkpoints, plan memory, time
your setup."""
EXAMPLES = """examples:
  qwen35-mlx generate --model Qwen/Qwen3.5-0.8B --prompt "Why is the sky blue?"
  qwen35-mlx chat --model Qwen/Qwen3.5-0.8B
  qwen35-mlx convert --hf-path Qwen/Qwen3.5-0.8B --mlx-path qwen35-0.8b-4bit -q

`qwen35-mlx COMMAND --help` lists a command's options."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qwen35-mlx",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_args(
            subparsers.add_parser(name, help=module.__doc__, description=module.__doc__)
        )
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].main(args) or 0
    except (ValueError, OSError) as error:  # bad input: say what and how to fix it
        print(f"qwen35-mlx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
