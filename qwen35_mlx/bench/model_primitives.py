"""MLX primitives one decoded token costs the whole text model (embedding, every decoder layer,
final norm, LM head), ours against mlx-lm's qwen3_5, each on its plain and its Metal branch
(docs/ARCHITECTURE.md §8).

The token is traced with `count.primitive_counts` (`mx.export_function` records the graph and
never runs it), so the Metal branches are counted on any machine: ours with every DeltaNet
layer's fused decode step forced, mlx-lm's with its gated delta kernel taken as on a Mac
(`mlx_lm_metal_branch`). Weights and cache arrays are the traced function's inputs (a trace
would write constants to disk): stand-ins of the real shapes and of the dtypes a bfloat16 (or
4-bit) load gives, zeros broadcast from one element, so even the 9B costs no memory; the graph
depends on shapes and dtypes only. Every cache already holds `CACHED_TOKENS` tokens, B = 1.

The trace draws each fast op (rms_norm, rope, scaled_dot_product_attention, layer_norm) as
its CPU fallback ops and each mx.compile'd function (mlx.nn's silu and softplus, mlx-lm's SwiGLU,
gates, per-token step) op by op. MLX records a fast op as one primitive on a Metal stream (sdpa
where MLX's rule fuses it, `attention.metal_fuses`) and a compiled function as its fused
primitives on any device. Both are reported: "traced here" as drawn, "primitives" as MLX
records the graph on a Mac, each such call's surplus (`Call.surplus`, from the same call traced
and built on its own) taken off.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..models import attention
from ..models.config import ModelConfig
from ..models.model import Model
from .count import graph_counts, primitive_counts
from .random_checkpoint import config_json
from .report import print_rows, progress

SIZES = ("0.8B", "9B")
WEIGHTS = ("bf16", "4-bit")
CACHED_TOKENS = 100  # held by every cache before the counted token
GROUP_SIZE = 64
FAST_OPS = ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")
IMPLEMENTATIONS = ("ours CPU", "ours Metal", "mlx-lm", "mlx-lm Metal")
PEER = "mlx-lm Metal"  # the ratios' reference
NO_MLX_LM = "mlx-lm is not installed (pip install 'qwen35-mlx[bench]'): its rows are left out"

Slot = tuple[object, int | str]  # where a cache holds an array: (list, index) or (object, name)


@dataclass(frozen=True)
class DecodeCount:
    size: str
    weights: str
    implementation: str
    primitives: int  # as MLX records the graph on a Metal stream
    traced: int  # as drawn here: fast ops as their fallbacks, compiled functions op by op
    kernels: int  # custom-kernel dispatches


COMPILED = type(mx.compile(lambda x: x))  # what mx.compile returns
# whose module-level compiled functions count (mlx.nn: silu, softplus, ...)
COMPILING_MODULES = ("mlx.nn", "mlx_lm.", "qwen35_mlx.")


@dataclass(frozen=True)
class Spec:
    """An array argument by shape and dtype."""

    shape: tuple[int, ...]
    dtype: mx.Dtype


@dataclass(frozen=True)
class Call:
    """A call met while tracing that MLX records as fewer primitives than the trace draws: an
    mx.fast op (one primitive on a Metal stream) or an mx.compile'd function (fused)."""

    fn: Callable
    args: tuple  # arrays as `Spec`s
    kwargs: tuple  # (name, value) pairs, arrays as `Spec`s
    compiled: bool

    def surplus(self) -> int:
        """Primitives the trace draws for this call beyond those MLX records."""
        return _surplus(self)


def _spec(x):
    return Spec(x.shape, x.dtype) if isinstance(x, mx.array) else x


def _filled(call: Call) -> tuple[list, dict]:
    """The call's arguments with evaluated zeros for its arrays (leaves of any graph)."""
    zeros = lambda x: mx.zeros(x.shape, x.dtype) if isinstance(x, Spec) else x
    args, kwargs = [zeros(a) for a in call.args], {k: zeros(v) for k, v in call.kwargs}
    mx.eval([x for x in (*args, *kwargs.values()) if isinstance(x, mx.array)])
    return args, kwargs


@functools.cache
def _surplus(call: Call) -> int:
    args, kwargs = _filled(call)

    def traced(*arrays):
        filled = iter(arrays)
        inputs = [next(filled) if isinstance(a, mx.array) else a for a in args]
        out = call.fn(*inputs, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    arrays = [a for a in args if isinstance(a, mx.array)]
    drawn = sum(primitive_counts(traced, *arrays).values())
    if not call.compiled:
        return drawn - 1
    out = call.fn(*args, **kwargs)  # built lazily: one Compiled primitive per fused chain
    return drawn - sum(graph_counts(*(out if isinstance(out, tuple) else (out,))).values())


@contextlib.contextmanager
def calls_recorded() -> Iterator[list[Call]]:
    """Yields a list that gets every call, inside, of an mx.fast op a Metal stream fuses
    (sdpa where `attention.metal_fuses`) and of a module-level mx.compile'd function of mlx.nn,
    mlx-lm or this package, calls made by a recorded compiled function left out."""
    calls: list[Call] = []
    sites = [(mx.fast, name, getattr(mx.fast, name), False) for name in FAST_OPS]
    sites += [
        (module, name, fn, True)
        for module_name, module in list(sys.modules.items())
        if module_name.startswith(COMPILING_MODULES)
        for name, fn in list(vars(module).items())
        if isinstance(fn, COMPILED)
    ]

    depth = 0  # compiled calls under way: what they call is theirs

    def recording(fn: Callable, name: str, compiled: bool) -> Callable:
        def call(*args, **kwargs):
            nonlocal depth
            fused = compiled or name != "scaled_dot_product_attention"
            if not depth and (fused or attention.metal_fuses(*args[:3])):
                specs = tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))
                calls.append(Call(fn, tuple(map(_spec, args)), specs, compiled))
            depth += compiled
            try:
                return fn(*args, **kwargs)
            finally:
                depth -= compiled

        return call

    try:
        for holder, name, fn, compiled in sites:
            setattr(holder, name, recording(fn, name, compiled))
        yield calls
    finally:
        for holder, name, fn, _ in sites:
            setattr(holder, name, fn)


def stand_in_weights(model: nn.Module, keeps_float32: Callable[[str], bool]) -> None:
    """Every parameter replaced by zeros of its shape, broadcast from one element (nothing
    allocated): float32 where `keeps_float32(name)`, else bfloat16; packed quantized weights
    keep their integer dtype."""

    def stand_in(name: str, w: mx.array) -> mx.array:
        dtype = w.dtype
        if mx.issubdtype(dtype, mx.floating):
            dtype = mx.float32 if keeps_float32(name) else mx.bfloat16
        return mx.broadcast_to(mx.zeros((), dtype=dtype), w.shape)

    weights = [(name, stand_in(name, w)) for name, w in tree_flatten(model.parameters())]
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    model.eval()  # as `load` leaves it: mlx-lm takes its kernel only outside training


def _get(slot: Slot) -> mx.array:
    holder, key = slot
    return holder[key] if isinstance(key, int) else getattr(holder, key)


def _set(slot: Slot, x: mx.array) -> None:
    holder, key = slot
    if isinstance(key, int):
        holder[key] = x
    else:
        setattr(holder, key, x)


def metal_counts(fn, *args: mx.array) -> tuple[int, int, int]:
    """(primitives as MLX records them on a Metal stream, primitives as traced here, custom
    kernels) of `fn(*args)`, traced with `primitive_counts`."""
    with calls_recorded() as calls:
        counts = primitive_counts(fn, *args)
    surplus = sum(call.surplus() for call in calls)
    traced = sum(counts.values())
    return traced - surplus, traced, counts["CustomKernel"]


def count_decode(
    model: nn.Module, cache: list, slots: list[Slot], forward: Callable[[list], mx.array]
) -> tuple[int, int, int]:
    """`metal_counts` of `forward(cache)` (the logits of one token) and the cache arrays at
    `slots` after it, weights and cache arrays passed in as the trace's inputs."""
    weights = tree_flatten(model.parameters())
    names = [name for name, _ in weights]

    def step(*inputs):
        model.update(tree_unflatten(list(zip(names, inputs))))
        for slot, x in zip(slots, inputs[len(names) :]):
            _set(slot, x)
        logits = forward(cache)
        return [logits, *(_get(slot) for slot in slots)]

    try:
        return metal_counts(step, *(w for _, w in weights), *map(_get, slots))
    finally:
        model.update(tree_unflatten(weights))


def checkpoint_config(size: str) -> dict:
    """The config.json of a text-only checkpoint of `size`."""
    return config_json(size, vision=False, mtp=False)


def our_model(config: dict, weights: str) -> Model:
    """Our model of a config.json as `load` gives a bf16 checkpoint, or one quantized by
    `convert`'s default hybrid recipe."""
    model = Model(ModelConfig.from_hf(config))
    if weights == "4-bit":
        nn.quantize(
            model,
            group_size=GROUP_SIZE,
            bits=4,
            class_predicate=Model.quant_predicate("hybrid", 4, GROUP_SIZE),
        )
    stand_in_weights(model, lambda name: not Model.cast_predicate(name))
    return model


def our_decode(model: Model, decode_path: str) -> tuple[int, int, int]:
    """`count_decode` of our model, DeltaNet layers on `decode_path` ("fused" or "plain")."""
    text = model.config.text
    cache = model.language_model.make_cache()
    slots = []
    for layer, layer_cache in zip(model.layers, cache):
        if layer.is_linear:
            layer.linear_attn.decode_path = decode_path
            _fill_deltanet(layer_cache, text, text.conv_dim)
            slots += [(layer_cache.arrays, 0), (layer_cache.arrays, 1)]
        else:
            _fill_kv(layer_cache, text)
            slots += [(layer_cache.buffer, "keys"), (layer_cache.buffer, "values")]
    forward = lambda cache: model.language_model(mx.array([[0]]), cache)
    return count_decode(model, cache, slots, forward)


def _fill_kv(cache, text) -> None:
    """`CACHED_TOKENS` keys and values [1, Hkv, T, D] through the cache's own update."""
    keys = mx.zeros((1, text.num_key_value_heads, CACHED_TOKENS, text.head_dim), mx.bfloat16)
    mx.eval(cache.update_and_fetch(keys, keys))


def _fill_deltanet(cache, text, conv_dim: int) -> None:
    """Conv state [1, K-1, conv_dim] and recurrent state [1, Hv, Dv, Dk] float32."""
    cache[0] = mx.zeros((1, text.linear_conv_kernel_dim - 1, conv_dim), dtype=mx.bfloat16)
    cache[1] = mx.zeros(
        (1, text.linear_num_value_heads, text.linear_value_head_dim, text.linear_key_head_dim),
        dtype=mx.float32,
    )
    mx.eval(cache[0], cache[1])


def mlx_lm_model(config: dict, weights: str) -> nn.Module:
    """mlx-lm's qwen3_5 model of a config.json as `mlx_lm.load` gives it (its cast predicate),
    or quantized by mlx-lm's own `quantize_model`."""
    from mlx_lm.models import qwen3_5
    from mlx_lm.utils import quantize_model

    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(config))
    if weights == "4-bit":
        with contextlib.redirect_stdout(io.StringIO()):  # it prints bits per weight
            quantize_model(model, {}, GROUP_SIZE, 4)
    stand_in_weights(model, lambda name: not model.cast_predicate(name))
    return model


def mlx_lm_decode(model: nn.Module) -> tuple[int, int, int]:
    """`count_decode` of mlx-lm's model (its branch as the default device decides)."""
    args = model.language_model.args
    cache = model.make_cache()
    slots = []
    for layer, layer_cache in zip(model.layers, cache):
        if layer.is_linear:
            _fill_deltanet(layer_cache, args, layer.linear_attn.conv_dim)
            slots += [(layer_cache.cache, 0), (layer_cache.cache, 1)]
        else:
            _fill_kv(layer_cache, args)
            slots += [(layer_cache, "keys"), (layer_cache, "values")]
    forward = lambda cache: model(mx.array([[0]]), cache=cache)
    return count_decode(model, cache, slots, forward)


@contextlib.contextmanager
def mlx_lm_metal_branch() -> Iterator[None]:
    """mlx-lm's graphs as a Mac builds them: mlx-lm builds its gated delta kernels at import
    only where Metal is available (the packed one for Dk = 128, the plain one for other head
    dims), and takes them only when the default device is the GPU; here the kernels are built
    and both checks answer yes while graphs are built (building records the kernel call, it
    never runs it), all restored after."""
    from mlx_lm.models import gated_delta

    kernels = {
        "_gated_delta_kernel": gated_delta._make_gated_delta_kernel,
        "_gated_delta_kernel_packed": gated_delta._make_gated_delta_packed_kernel,
    }
    saved_kernels = {name: getattr(gated_delta, name) for name in kernels}
    saved = mx.metal.is_available, mx.default_device
    try:
        mx.metal.is_available = lambda: True
        for name, make in kernels.items():
            setattr(gated_delta, name, make())
        mx.default_device = lambda: mx.gpu
        yield
    finally:
        mx.metal.is_available, mx.default_device = saved
        for name, kernel in saved_kernels.items():
            setattr(gated_delta, name, kernel)


def mlx_lm_available() -> bool:
    try:
        import mlx_lm.models.qwen3_5  # noqa: F401
    except ImportError:
        return False
    return True


def count_model(size: str, weights: str, with_mlx_lm: bool) -> list[DecodeCount]:
    """Every implementation's count at one size and weight format."""
    progress(f"counting primitives per decoded token, whole {size} model, {weights} weights")
    config = checkpoint_config(size)
    ours = our_model(config, weights)
    counts = {"ours CPU": our_decode(ours, "plain"), "ours Metal": our_decode(ours, "fused")}
    if with_mlx_lm:
        peer = mlx_lm_model(config, weights)
        counts["mlx-lm"] = mlx_lm_decode(peer)
        with mlx_lm_metal_branch():
            counts["mlx-lm Metal"] = mlx_lm_decode(peer)
    return [DecodeCount(size, weights, name, *count) for name, count in counts.items()]


def print_decode_counts(counts: list[DecodeCount]) -> None:
    peers = {(c.size, c.weights): c.primitives for c in counts if c.implementation == PEER}
    rows = [
        (
            c.size,
            c.weights,
            c.implementation,
            c.primitives,
            c.traced,
            c.kernels,
            f"{c.primitives / peers[c.size, c.weights]:.2f}x"
            if (c.size, c.weights) in peers
            else "-",
        )
        for c in counts
    ]
    print(
        f"\nMLX primitives per decoded token, whole text model (embedding, all layers, final "
        f"norm, LM head), B = 1, {CACHED_TOKENS} tokens cached; graphs built, never run:"
    )
    print_rows(
        (
            "size",
            "weights",
            "implementation",
            "primitives",
            "traced here",
            "custom kernels",
            f"vs {PEER}",
        ),
        rows,
        text_columns=3,
    )
    print(
        "(primitives: as MLX records the graph on a Metal stream, each fused mx.fast op one "
        "primitive, each mx.compile'd function its fused primitives; traced here: as "
        "mx.export_function draws it on this machine, fast ops as their CPU fallbacks and "
        "compiled functions op by op; Metal rows force our fused DeltaNet decode step and "
        "mlx-lm's gated delta kernel)"
    )


def bench_decode_primitives(sizes=SIZES, weights=WEIGHTS) -> None:
    with_mlx_lm = mlx_lm_available()
    if not with_mlx_lm:
        print(NO_MLX_LM)
    counts = [c for size in sizes for w in weights for c in count_model(size, w, with_mlx_lm)]
    print_decode_counts(counts)
