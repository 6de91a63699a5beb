"""The model card (README.md) written beside a converted checkpoint."""

from __future__ import annotations

from pathlib import Path

LICENSE = "apache-2.0"  # every Qwen3.5 small model is released under Apache 2.0


def recipe_lines(
    quantization: dict | None, recipe: str, vision: bool, mtp: bool, dtype: str | None
) -> list[str]:
    floats = f"float weights in {dtype or 'the source dtype'}"
    if not quantization:
        return [f"- Not quantized: {floats}; norms and `A_log` in float32."]
    bits, group = quantization["bits"], quantization["group_size"]
    lines = [f"- Affine {bits}-bit quantization, group size {group}, recipe `{recipe}`."]
    if recipe == "hybrid":
        lines.append(
            "- DeltaNet gate projections `in_proj_a`/`in_proj_b` kept float; "
            "`linear_attn.out_proj` at 8 bits."
        )
    lines.append(
        f"- Vision tower {'quantized' if vision else 'kept float'}; MTP head "
        f"{'quantized' if mtp else 'kept float'}; norms, `A_log`, `dt_bias` and "
        f"conv1d float ({floats})."
    )
    return lines


def model_card(
    source: str, quantization: dict | None, recipe: str, vision: bool, mtp: bool, dtype: str | None
) -> str:
    name = Path(str(source).rstrip("/")).name
    on_hub = not Path(str(source)).exists()  # a repo id, not a local directory
    origin = f"[{source}](https://huggingface.co/{source})" if on_hub else f"`{name}`"
    lines = [
        "---",
        f"license: {LICENSE}",
        "library_name: mlx",
        *([f"base_model: {source}"] if on_hub else []),
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- mlx",
        "- qwen3_5",
        "- qwen35-mlx",
        "---",
        "",
        f"# {name} (MLX)",
        "",
        f"Converted from {origin} with qwen35-mlx. The whole model is kept: text decoder, "
        "vision tower and multi-token-prediction head.",
        "",
        "## Recipe",
        "",
        *recipe_lines(quantization, recipe, vision, mtp, dtype),
        "",
        "## Use",
        "",
        "```sh",
        "pip install qwen35-mlx",
        'qwen35-mlx generate --model <this repo> --prompt "Hello"',
        "```",
        "",
        "```python",
        "from qwen35_mlx import load, generate",
        'model, tokenizer = load("<this repo>")',
        'print(generate(model, tokenizer, [{"role": "user", "content": "Hello"}]).text)',
        "```",
        "",
        "The checkpoint also loads in mlx-vlm (text, vision, MTP drafter) and, for text, in "
        "mlx-lm.",
        "",
        f"License: {LICENSE}, as the source model.",
        "",
    ]
    return "\n".join(lines)
