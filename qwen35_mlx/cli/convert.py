"""Convert a Hugging Face Qwen3.5 checkpoint to MLX (float or 4/6/8-bit), optionally upload it."""

from __future__ import annotations

import argparse

from ..convert import convert
from ..loading import DTYPES
from ..models.model import QUANT_RECIPES


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-path", required=True, help="Hugging Face repo id or local directory")
    parser.add_argument("--mlx-path", default="mlx_model", help="output directory")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, default=4, help="bits per weight: 4, 6 or 8")
    parser.add_argument("--q-group-size", type=int, default=64, help="group size: 32, 64 or 128")
    parser.add_argument(
        "--recipe",
        choices=QUANT_RECIPES,
        default="hybrid",
        help="hybrid: architecture-aware (default); uniform: every matrix alike",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the float weights (default: the source's)"
    )
    parser.add_argument(
        "--quantize-vision",
        action="store_true",
        help="also quantize the vision tower (kept float by default)",
    )
    parser.add_argument(
        "--quantize-mtp",
        action="store_true",
        help="also quantize the MTP head (kept float by default)",
    )
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="turn a quantized MLX checkpoint back into float weights",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    parser.add_argument(
        "--no-verify",
        dest="verify_output",
        action="store_false",
        help="skip loading the result and comparing it with the source (not with --upload-repo)",
    )
    parser.add_argument(
        "--report", action="store_true", help="print the per-tensor quantization error table"
    )
    parser.add_argument(
        "--upload-repo", help="upload the result to this Hugging Face repo once it verified"
    )
    parser.add_argument("--revision", help="hub revision of --hf-path")


def main(args: argparse.Namespace) -> int:
    convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        recipe=args.recipe,
        dtype=args.dtype,
        quantize_vision=args.quantize_vision,
        quantize_mtp=args.quantize_mtp,
        dequantize=args.dequantize,
        force=args.force,
        verify_output=args.verify_output,
        report=args.report,
        upload_repo=args.upload_repo,
        revision=args.revision,
    )
    return 0
