"""Peak memory of prefill by prompt length, blocked attention against the plain (fast) path,
and the KV cache's bytes per token at 16, 8 and 4 bits.

Each length is prefilled as `generate_step` does (chunks of `--prefill-step-size`, only the
cache evaluated, so no logits) from a fresh cache after `mx.reset_peak_memory()`; the head's
one-token step is left out, its memory does not depend on the prompt. "rest" is the peak less
the weights and the KV cache left at the end: the working memory of prefill, which the
blocked path keeps flat as the prompt grows (ratio vs the first length). The fast path on a
backend without a fused kernel for the head dim builds [heads, chunk, keys] scores instead.
"""

from __future__ import annotations

import argparse
import gc
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..loading import load_model
from ..models import attention
from ..models.cache import KVCache, QuantizedKVCache
from ..models.config import LINEAR
from .report import print_rows, progress

MB = 1 << 20


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[4096, 32768],
        help="prompt lengths (the first is the ratio's base)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=attention.PATHS,
        default=list(attention.PATHS),
        help="attention paths to force",
    )
    parser.add_argument(
        "--prefill-step-size", type=int, default=2048, help="prompt tokens per forward pass"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")


def kv_bytes(cache: list) -> int:
    return sum(a.nbytes for c in cache if hasattr(c, "offset") for a in c.state)


def prefill_peak(model, prompt: mx.array, step: int) -> tuple[int, int, float]:
    """(peak bytes, KV bytes, seconds) of prefilling `prompt` [T] into a fresh cache."""
    cache = model.make_cache()
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for first in range(0, prompt.size, step):
        model(prompt[None, first : first + step], cache=cache)
        mx.eval([c.state for c in cache])
    seconds = time.perf_counter() - start
    return mx.get_peak_memory(), kv_bytes(cache), seconds


def kv_bytes_per_token(config, dtype: mx.Dtype, bits: int | None, group_size: int = 64) -> int:
    """Measured from a cache's arrays: one attention layer filled with a full buffer."""
    cache = KVCache() if bits is None else QuantizedKVCache(group_size, bits)
    tokens = KVCache.step
    x = mx.zeros((1, config.num_key_value_heads, tokens, config.head_dim), dtype)
    cache.update_and_fetch(x, x)
    return sum(a.nbytes for a in cache.state) // tokens


def bench_prefill_memory(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    config = model.language_model.config
    mx.eval(model.parameters())  # loaded lazily: materialise before measuring
    weights = sum(w.nbytes for _, w in tree_flatten(model.parameters()))
    rng = np.random.default_rng(args.seed)
    rows = []
    for path in args.paths:
        base = None
        for tokens in args.tokens:
            prompt = mx.array(rng.integers(0, min(config.vocab_size, 100_000), size=tokens))
            progress(f"{path}: prefill of {tokens} tokens")
            attention.forced_path = path
            try:
                peak, kv, seconds = prefill_peak(model, prompt, args.prefill_step_size)
            finally:
                attention.forced_path = None
            rest = peak - weights - kv
            base = base or rest
            rows.append(
                [
                    path,
                    tokens,
                    f"{peak / MB:.0f}",
                    f"{weights / MB:.0f}",
                    f"{kv / MB:.1f}",
                    f"{rest / MB:.0f}",
                    f"{rest / base:.2f}",
                    f"{seconds:.1f}",
                ]
            )
    print_rows(
        ["path", "tokens", "peak MB", "weights MB", "KV MB", "rest MB", "rest ratio", "seconds"],
        rows,
        text_columns=1,
    )
    print()
    dtype = model.language_model.model.embed_tokens.weight.dtype
    layers = sum(t != LINEAR for t in config.layer_types)
    float_bytes = kv_bytes_per_token(config, dtype, None)
    kv_rows = []
    for bits in (None, 8, 4):
        per_layer = kv_bytes_per_token(config, dtype, bits)
        kv_rows.append(
            [
                str(bits or mx.finfo(dtype).dtype).replace("mlx.core.", ""),
                per_layer,
                per_layer * layers,
                f"{per_layer / float_bytes:.3f}",
            ]
        )
    print(
        f"KV cache per token ({layers} attention layers, {config.num_key_value_heads} KV "
        f"heads x head dim {config.head_dim}, group size 64):"
    )
    print_rows(["bits", "bytes/token/layer", "bytes/token", "vs float"], kv_rows)
    return 0
