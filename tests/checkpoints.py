"""Tiny random Qwen3.5 checkpoints in the real Hugging Face layout, built by transformers.

Every parameter matters: the (1+w) norms, the gated norm, A_log and dt_bias are perturbed
away from their initial values (docs/ARCHITECTURE.md §9), and the weights are scaled up so that
logits are far from uniform and greedy decoding is not decided by float noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
)

from processor_files import write_processor_files
from tokenizer_files import write_tokenizer_files

ROPE = {
    "rope_type": "default",
    "rope_theta": 10_000_000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [2, 1, 1],
    "mrope_interleaved": True,
}
VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    in_channels=3,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=64,
    num_position_embeddings=16,
)
VISION_IDS = dict(
    image_token_id=505, video_token_id=506, vision_start_token_id=503, vision_end_token_id=504
)


@dataclass(frozen=True)
class Spec:
    """What to build; `id` names it in test ids."""

    layout: str = "causal"  # "causal" (Qwen3_5ForCausalLM) or "conditional" (+ vision tower)
    hv_per_hk: int = 2  # linear_num_value_heads / linear_num_key_heads
    tied: bool = False
    num_layers: int = 4
    max_position_embeddings: int = 4096
    thinking_by_default: bool = False
    seed: int = 0
    max_shard_size: str | None = None  # e.g. "50KB" for a sharded checkpoint
    rope_type: str = "default"  # or "yarn" (factor 4, as the model cards' long-context setting)

    @property
    def id(self) -> str:
        return (
            f"{self.layout}-hv{self.hv_per_hk}-{'tied' if self.tied else 'untied'}"
            f"{'' if self.rope_type == 'default' else '-' + self.rope_type}"
        )


def rope_parameters(spec: Spec) -> dict:
    if spec.rope_type == "yarn":
        return {
            **ROPE,
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    return ROPE


def text_fields(spec: Spec) -> dict:
    return dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2 * spec.hv_per_hk,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=rope_parameters(spec),
        tie_word_embeddings=spec.tied,
        eos_token_id=500,
    )


def build_reference(spec: Spec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)
    if spec.layout == "causal":
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text_fields(spec)))
    else:
        config = Qwen3_5Config(
            text_config=text_fields(spec),
            vision_config=VISION,
            tie_word_embeddings=spec.tied,
            **VISION_IDS,
        )
        model = Qwen3_5ForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("norm" in name or "A_log" in name or "dt_bias" in name):
                param.add_(0.1 * torch.randn_like(param))
            elif "embed_tokens" in name or "lm_head" in name:
                param.mul_(20.0)  # peaked logits: greedy decoding far from ties
    return model.eval()


def write_checkpoint(spec: Spec, directory: Path) -> torch.nn.Module:
    """Saves the reference model and tokenizer to `directory`; returns the torch model."""
    model = build_reference(spec)
    kwargs = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    write_tokenizer_files(directory, thinking_by_default=spec.thinking_by_default)
    if spec.layout == "conditional":
        write_processor_files(directory)
    return model
