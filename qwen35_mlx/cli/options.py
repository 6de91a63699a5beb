"""Flags shared by the commands that generate; each maps one to one onto an API keyword."""

from __future__ import annotations

import argparse

from ..loading import DTYPES, load
from ..progress import add_progress_arg

# stream_generate keyword arguments, each set by the flag of the same name (--max-tokens, ...)
GENERATION_KWARGS = (
    "enable_thinking",
    "max_tokens",
    "temp",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "prefill_step_size",
    "kv_bits",
    "kv_group_size",
    "quantized_kv_start",
    "mtp",
    "num_draft_tokens",
    "adaptive_drafting",
)
# the images and videos shown with the prompt: --image and --video, repeatable
MEDIA_KWARGS = ("images", "videos")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint directory or Hugging Face repo id (load's path_or_repo)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)"
    )


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--enable-thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="think before answering (default: the chat template's: off for 0.8B/2B, on for 4B/9B)",
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0: all)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min probability vs the top one")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="multiplicative penalty on generated tokens (1.0: off)",
    )
    parser.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="subtracted once from tokens already generated (cards: 1.5)",
    )
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="subtracted per earlier occurrence of a generated token",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end the answer where this text first appears; repeatable",
    )
    parser.add_argument(
        "--prefill-step-size",
        type=int,
        default=2048,
        help="prompt tokens per forward pass during prefill",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=(4, 8),
        default=None,
        help="keep the attention keys and values quantized to 8 or 4 bits",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        choices=(32, 64, 128),
        default=64,
        help="values per quantization group of --kv-bits",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=0,
        help="quantize once the cache holds this many tokens",
    )
    add_progress_arg(parser)  # not a GENERATION_KWARGS flag: the CLI turns it into a callback
    add_speculation_args(parser)


def add_speculation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mtp",
        action="store_true",
        help="decode speculatively, drafting with the checkpoint's MTP head "
        "(the same greedy tokens, the same sampling distribution)",
    )
    parser.add_argument(
        "--draft-model",
        metavar="MODEL",
        help="decode speculatively, drafting with this smaller model of the same tokenizer "
        "(e.g. Qwen3.5-0.8B for 9B)",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=int,
        default=3,
        metavar="N",
        help="most tokens drafted per round, 1 to 16 (fewer, or none, when they do not pay)",
    )
    parser.add_argument(
        "--adaptive-drafting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="adapt the drafted tokens to the measured acceptance and costs "
        "(--no-adaptive-drafting: always N)",
    )


def draft_model_kwargs(args: argparse.Namespace) -> dict:
    """The loaded --draft-model (with its tokenizer, which must match the model's)."""
    if args.draft_model is None:
        return {}
    return {"draft_model": load(args.draft_model, dtype=args.dtype)}


def add_media_args(parser: argparse.ArgumentParser, chat: bool = False) -> None:
    when = " with the first message (later ones: /image, /video in the chat)" if chat else ""
    parser.add_argument(
        "--image",
        dest="images",
        action="extend",
        nargs="+",
        metavar="PATH",
        help=f"an image to show the model{when}; repeatable",
    )
    parser.add_argument(
        "--video",
        dest="videos",
        action="extend",
        nargs="+",
        metavar="PATH",
        help=f"a video file (PyAV), a directory of frames or an animated GIF{when}; repeatable",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="most pixels of an image after resizing, about 1024 per token "
        "(default: the checkpoint's, 16M); load's "
        "processor_options={'max_pixels': N}",
    )


def load_kwargs(args: argparse.Namespace) -> dict:
    options = {"max_pixels": args.max_pixels} if args.max_pixels else None
    return {"dtype": args.dtype, "processor_options": options}


def generation_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in GENERATION_KWARGS}


def media_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in MEDIA_KWARGS}
