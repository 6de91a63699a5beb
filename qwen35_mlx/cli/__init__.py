"""The `qwen35-mlx` command: one module per subcommand, each with add_args(parser) and main(args)."""

from __future__ import annotations

import argparse
import sys

from . import bench, chat, convert, generate, perplexity, upload

COMMANDS = {"generate": generate, "chat": chat, "convert": convert, "upload": upload,
            "bench": bench, "perplexity": perplexity}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen35-mlx", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_args(subparsers.add_parser(name, help=module.__doc__,
                                              description=module.__doc__))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].main(args) or 0
    except (ValueError, OSError) as error:  # bad input: say what and how to fix it
        print(f"qwen35-mlx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
