"""Gated DeltaNet benchmark: our scan paths against MLX's and mlx-lm's, and primitives per token.

Speed: each implementation runs the scan of one DeltaNet layer from what the layer hands it
(bf16 q, k, v after the conv, a, b; float32 A_log, dt_bias, zero state), including its own q/k
normalisation and gate computation: ours (`gated_delta_update`, every path that runs on this
device), `mx.fast.gated_delta_update` (MLX's built-in, fed the same way mlx-lm feeds its
kernel) and mlx-lm's `gated_delta_update`. Times are the best of N wall-clock repeats of
`mx.eval` (and the MLX peak memory of a run), taken in rounds (every implementation once
per round) so that a busy machine slows all alike; each row's ratio is against the fastest
peer (MLX or mlx-lm) of the same run.

Primitives: the graph of one decoded token through a whole DeltaNet layer (projections, conv,
scan, gated norm, cache update) at a size's real shapes, traced with `mx.export_function`
(count.py), ours on each decode path (the fused Metal step traces on any machine) against
mlx-lm's `GatedDeltaNet` on this device and on its Metal branch. Off Metal some fast ops
(rms_norm) are drawn as their fallback ops, and mx.compile'd functions (mlx-lm's step) are
traced op by op, not fused.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from qwen35_mlx.bench.count import decode_primitives, primitive_counts
from qwen35_mlx.bench.model_primitives import mlx_lm_metal_branch
from qwen35_mlx.bench.random_checkpoint import config_json
from qwen35_mlx.bench.report import print_rows, progress
from qwen35_mlx.gated_delta import SCAN_PATHS, gated_delta_update
from qwen35_mlx.models.config import ModelConfig
from qwen35_mlx.models.model import Model
from qwen35_mlx.models.text import GatedDeltaNet

SIZES = ("0.8B", "9B")  # the two head layouts: Hv = Hk = 16, and Hk = 16, Hv = 32
DEFAULT_TOKENS = (64, 512, 2048)
PEERS = ("mx.fast", "mlx-lm")
DTYPE = mx.bfloat16  # the activation dtype the model feeds the scan

Scan = Callable[[dict], tuple[mx.array, mx.array]]


@dataclass
class Timing:
    size: str
    tokens: int
    name: str
    seconds: float
    peak_gb: float  # MLX peak memory of one run
    ratio: float = float("nan")  # fastest peer's seconds / ours: above 1 = faster than it


def text_config(size: str) -> dict:
    return config_json(size)["text_config"]


def layer_inputs(size: str, tokens: int, seed: int = 0) -> dict[str, mx.array]:
    """Random inputs of one layer's scan, B = 1, in the dtypes the model passes."""
    t = text_config(size)
    Hk, Hv = t["linear_num_key_heads"], t["linear_num_value_heads"]
    Dk, Dv = t["linear_key_head_dim"], t["linear_value_head_dim"]
    key = mx.random.key(seed)
    q, k, v, a, b, A, dt_bias = mx.random.split(key, 7)
    inputs = dict(
        q=mx.random.normal((1, tokens, Hk, Dk), key=q),
        k=mx.random.normal((1, tokens, Hk, Dk), key=k),
        v=mx.random.normal((1, tokens, Hv, Dv), key=v),
        a=mx.random.normal((1, tokens, Hv), key=a),
        b=mx.random.normal((1, tokens, Hv), key=b),
    )
    inputs = {name: x.astype(DTYPE) for name, x in inputs.items()}
    inputs.update(
        A_log=mx.log(mx.random.uniform(1, 16, (Hv,), key=A)),
        dt_bias=mx.random.normal((Hv,), key=dt_bias),
        state=mx.zeros((1, Hv, Dv, Dk), dtype=mx.float32),
    )
    mx.eval(inputs)
    return inputs


def ours(path: str) -> Scan:
    return lambda x: gated_delta_update(**x, path=path)


def _normalized(x: dict) -> tuple[mx.array, mx.array]:
    from mlx_lm.models.gated_delta import normalize_qk

    return normalize_qk(x["q"], x["k"], inv_scale=x["q"].shape[-1] ** -0.5, eps=1e-6)


def mlx_fast(x: dict) -> tuple[mx.array, mx.array]:
    from mlx_lm.models.gated_delta import compute_g

    q, k = _normalized(x)
    decay = compute_g(x["A_log"], x["a"], x["dt_bias"])  # alpha = exp(g), linear
    return mx.fast.gated_delta_update(q, k, x["v"], decay, mx.sigmoid(x["b"]), x["state"])


def mlx_lm(x: dict) -> tuple[mx.array, mx.array]:
    from mlx_lm.models.gated_delta import gated_delta_update as lm_update

    q, k = _normalized(x)
    return lm_update(q, k, x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], x["state"])


def implementations() -> dict[str, Scan]:
    """Ours on every path this device runs, then the peers."""
    return {
        **{f"ours {path}": ours(path) for path in SCAN_PATHS},
        "mx.fast": mlx_fast,
        "mlx-lm": mlx_lm,
    }


def time_scans(sizes, tokens, repeats: int) -> list[Timing]:
    timings = []
    for size in sizes:
        for T in tokens:
            inputs = layer_inputs(size, T)
            best, peak = {}, {}
            for repeat in range(repeats + 1):  # round 0 warms up
                progress(f"{size} heads, T = {T}: round {repeat} of {repeats}")
                for name, scan in implementations().items():
                    mx.reset_peak_memory()
                    start = time.perf_counter()
                    mx.eval(scan(inputs))
                    seconds = time.perf_counter() - start
                    peak[name] = mx.get_peak_memory() / 1e9
                    if repeat:
                        best[name] = min(best.get(name, seconds), seconds)
            fastest_peer = min(best[name] for name in PEERS)
            timings += [
                Timing(size, T, name, s, peak[name], fastest_peer / s) for name, s in best.items()
            ]
    return timings


def our_layer(size: str) -> GatedDeltaNet:
    """Our DeltaNet layer at a size's shapes, in the dtypes `load` gives a bf16 checkpoint."""
    config = ModelConfig.from_hf(config_json(size))
    layer = GatedDeltaNet(config.text)
    layer.update(
        tree_unflatten(
            [
                (name, w.astype(DTYPE) if Model.cast_predicate(name) else w)
                for name, w in tree_flatten(layer.parameters())
            ]
        )
    )
    return layer


def mlx_lm_decode_primitives(size: str) -> int:
    """Primitives of one decoded token through mlx-lm's qwen3_5 `GatedDeltaNet`."""
    from mlx_lm.models import qwen3_5
    from mlx_lm.models.cache import ArraysCache

    args = qwen3_5.TextModelArgs.from_dict({**text_config(size), "model_type": "qwen3_5_text"})
    layer = qwen3_5.GatedDeltaNet(args)
    layer.update(
        tree_unflatten(
            [
                (name, w if name.endswith("A_log") else w.astype(DTYPE))
                for name, w in tree_flatten(layer.parameters())
            ]
        )
    )
    layer.eval()  # as mlx_lm.load leaves it: mlx-lm takes its kernel only outside training
    mx.eval(layer.parameters())  # else unevaluated initialisers count too
    x = mx.zeros((1, 1, args.hidden_size), dtype=DTYPE)
    conv_state = mx.zeros((1, args.linear_conv_kernel_dim - 1, layer.conv_dim), dtype=DTYPE)
    state = mx.zeros((1, layer.num_v_heads, layer.head_v_dim, layer.head_k_dim))

    def step(x, conv_state, state):
        cache = ArraysCache(2)
        cache[0], cache[1] = conv_state, state
        return layer(x, cache=cache), cache[0], cache[1]

    return sum(primitive_counts(step, x, conv_state, state).values())


def mlx_lm_metal_decode_primitives(size: str) -> int:
    """`mlx_lm_decode_primitives` on mlx-lm's Metal branch, as a Mac runs it."""
    with mlx_lm_metal_branch():
        return mlx_lm_decode_primitives(size)


# One decoded token of one DeltaNet layer, by name: each counter takes the size.
DECODE_COUNTERS: dict[str, Callable[[str], int]] = {
    "ours plain": lambda size: decode_primitives(our_layer(size), "plain"),
    "ours fused": lambda size: decode_primitives(our_layer(size), "fused"),
    "mlx-lm": mlx_lm_decode_primitives,
    "mlx-lm metal": mlx_lm_metal_decode_primitives,
}


def count_primitives(size: str) -> dict[str, int]:
    progress(f"counting primitives per decoded token, {size} shapes")
    return {name: count(size) for name, count in DECODE_COUNTERS.items()}


def print_timings(timings: list[Timing]) -> None:
    columns = ("heads", "implementation", "T", "ms", "vs fastest peer", "peak GB")
    rows = [
        (
            t.size,
            t.name,
            str(t.tokens),
            f"{t.seconds * 1e3:.2f}",
            f"{t.ratio:.2f}x",
            f"{t.peak_gb:.3f}",
        )
        for t in timings
    ]
    print_rows(columns, rows, text_columns=2)
    print(
        "(vs fastest peer: the faster of mx.fast and mlx-lm at that size and T, divided by "
        "the row's time; above 1x = faster than both)"
    )


def print_primitives(size: str, counts: dict[str, int]) -> None:
    peers = ("mlx-lm", "mlx-lm metal")
    rows = [
        (name, str(n), *(f"{n / counts[peer]:.2f}x" for peer in peers))
        for name, n in counts.items()
    ]
    print(
        f"\nMLX primitives per decoded token, one DeltaNet layer at {size} shapes "
        f"(graph traced for {mx.default_device()}; 'metal' rows trace the Metal branch):"
    )
    print_rows(
        ("decode path", "primitives", *(f"vs {peer}" for peer in peers)), rows, text_columns=1
    )


def bench_kernels(sizes, tokens, repeats: int, count_size: str = "0.8B") -> None:
    if repeats < 1 or min(tokens) < 1:
        raise ValueError("--repeats and every --tokens value must be at least 1")
    timings = time_scans(sizes, tokens, repeats)
    counts = count_primitives(count_size)
    print(
        f"Gated DeltaNet scan, one layer, B = 1, bfloat16 inputs; best of {repeats} after a "
        f"warm-up; MLX {mx.__version__} on {mx.default_device()}"
    )
    print_timings(timings)
    print_primitives(count_size, counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description="Times one DeltaNet layer's scan (bf16 inputs, B = 1) with each of our "
        "paths that runs on this device, mx.fast.gated_delta_update and mlx-lm's "
        "gated_delta_update, in one run, as ratios against the faster of the two "
        "peers; then counts the MLX primitives one decoded token costs a DeltaNet "
        "layer on each decode path, ours against mlx-lm's, from the graph traced "
        "with mx.export_function.",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=list(DEFAULT_TOKENS),
        help="sequence lengths T (default: 64 512 2048; 8192 is heavy on a CPU: "
        "the per-token paths keep ~1.1 MB per token alive, 9 GB with the "
        "0.8B heads and twice that with the 9B ones)",
    )
    parser.add_argument(
        "--heads",
        nargs="+",
        choices=SIZES,
        default=list(SIZES),
        help="whose DeltaNet heads: 0.8B (Hk = Hv = 16), 9B (Hk = 16, Hv = 32)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per implementation (best)"
    )
    args = parser.parse_args(argv)
    bench_kernels(args.heads, args.tokens, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
