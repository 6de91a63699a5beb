"""Plan memory before loading: weights, KV cache, DeltaNet state and prefill peak of a
checkpoint (or a size: 0.8B, 2B, 4B, 9B) at a context length, against this machine's memory."""

from __future__ import annotations

import argparse

from ..plan import DEFAULT_KV_GROUP_SIZE, KV_BITS, format_plan, machine_memory, plan_memory


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (reads config.json and the safetensors "
        "headers only) or a size name: 0.8B, 2B, 4B, 9B (the bf16 release)",
    )
    parser.add_argument(
        "--context", type=int, required=True, help="tokens the cache will hold (prompt plus reply)"
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=16,
        help=f"bits per key/value element, one of {KV_BITS} (default 16)",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        default=DEFAULT_KV_GROUP_SIZE,
        help="elements per scale and bias of a quantized KV cache",
    )
    parser.add_argument(
        "--prefill-step-size",
        type=int,
        default=2048,
        help="prompt tokens per forward pass during prefill",
    )


def main(args: argparse.Namespace) -> int:
    plan = plan_memory(
        args.model,
        args.context,
        kv_bits=args.kv_bits,
        prefill_step_size=args.prefill_step_size,
        kv_group_size=args.kv_group_size,
    )
    print(format_plan(plan, machine_memory()))
    return 0
