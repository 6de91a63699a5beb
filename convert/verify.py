"""Checks after conversion: logits of the result against the source's, per-tensor errors."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from qwen35_mlx.loading import load_model

from .dequantize import QUANTIZED, dequantized_weight

PROMPT = (
    "Qwen3.5 mixes Gated DeltaNet layers with full attention. Write one sentence about "
    "the sea, then count from one to ten: 1, 2, 3"
)


def compare_logits(reference: mx.array, converted: mx.array) -> tuple[float, float]:
    """(relative error ||c - r|| / ||r||, mean KL(reference || converted) in nats per token)."""
    reference, converted = reference.astype(mx.float32), converted.astype(mx.float32)
    relative = mx.linalg.norm(converted - reference) / mx.linalg.norm(reference)
    log_p = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    log_q = converted - mx.logsumexp(converted, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()
    return relative.item(), kl.item()


def verify(source: Path, target: Path, tokenizer) -> tuple[float, float]:
    """Runs a short prompt through the source and the converted checkpoint and prints how far
    apart their next-token distributions are."""
    ids = mx.array([tokenizer.encode(PROMPT)])
    reference = load_model(source)(ids)
    mx.eval(reference)
    relative, kl = compare_logits(reference, load_model(target)(ids))
    print(
        f"[verify] {ids.shape[1]} tokens: logits relative error {relative:.3e}, "
        f"KL(source || converted) {kl:.3e} nats/token"
    )
    return relative, kl


def quantization_errors(float_weights: dict[str, mx.array], model) -> list[tuple[str, int, float]]:
    """(module, bits, ||dequantize(quantize(W)) - W|| / ||W||) for every quantized matrix."""
    rows = []
    for name, module in model.named_modules():
        if name in float_weights and isinstance(module, QUANTIZED):
            restored = dequantized_weight(module)
            weight = float_weights[name].astype(mx.float32)
            error = mx.linalg.norm(restored.astype(mx.float32) - weight) / mx.linalg.norm(weight)
            rows.append((name, module.bits, error.item()))
    return rows


def print_report(rows: list[tuple[str, int, float]]) -> None:
    width = max(len(name) for name, *_ in rows)
    print(f"{'tensor':<{width}}  bits  relative error")
    for name, bits, error in sorted(rows, key=lambda row: -row[2]):
        print(f"{name:<{width}}  {bits:>4}  {error:.3e}")
