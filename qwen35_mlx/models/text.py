"""Qwen3.5 text decoder: 3 Gated DeltaNet layers per gated full-attention layer.

Maths from transformers' `models/qwen3_5/modeling_qwen3_5.py` (the oracle the tests compare
against) and docs/ARCHITECTURE.md §2. The module tree keeps Hugging Face weight names under
`language_model.model.*` / `language_model.lm_head`, the layout mlx-lm and mlx-vlm also use.
Weights are held in run-time form: (1+w) norm weights already shifted (kept float32), conv1d
weights as [C, K, 1]; `loading.py` converts a Hugging Face checkpoint once, at load.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..gated_delta import gated_delta_decode, gated_delta_update, use_fused_decode
from . import attention
from .cache import RowKVCaches, make_layer_caches
from .config import LINEAR, TextConfig
from .rope import Rotary


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as transformers' (1+w) norm.

    `weight` holds the already shifted 1 + w (float32) so no shift is rounded into bf16.
    """

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,), dtype=mx.float32)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight, self.eps).astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """y = w * cast(rmsnorm_f32(o)) * silu(z_f32), plain w (transformers' RMSNormGated)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,), dtype=mx.float32)
        self.eps = eps

    def __call__(self, o: mx.array, z: mx.array) -> mx.array:
        normed = mx.fast.rms_norm(o.astype(mx.float32), None, self.eps).astype(o.dtype)
        gated = self.weight * normed * nn.silu(z.astype(mx.float32))
        return gated.astype(o.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DepthwiseConv(nn.Module):
    """Causal depthwise conv over time; `weight` [C, K, 1] as mlx's Conv1d stores it."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, 1))

    def __call__(self, padded: mx.array) -> mx.array:
        # padded: [B, K-1+T, C] (the K-1 previous inputs first) -> [B, T, C]
        channels = self.weight.shape[0]
        return mx.conv1d(padded, self.weight.astype(padded.dtype), groups=channels)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.Hk, self.Hv = config.linear_num_key_heads, config.linear_num_value_heads
        self.Dk, self.Dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.kernel = config.linear_conv_kernel_dim
        H, conv_dim, value_dim = config.hidden_size, config.conv_dim, config.value_dim
        self.in_proj_qkv = nn.Linear(H, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.Hv, bias=False)
        self.in_proj_a = nn.Linear(H, self.Hv, bias=False)
        self.conv1d = DepthwiseConv(conv_dim, self.kernel)
        self.A_log = mx.zeros((self.Hv,), dtype=mx.float32)
        self.dt_bias = mx.ones((self.Hv,))
        self.norm = GatedRMSNorm(self.Dv, config.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, H, bias=False)
        self.decode_path = None  # "fused" / "plain" forces; None: fused for one token on Metal

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x)  # [B, T, conv_dim]
        z = self.in_proj_z(x).reshape(B, T, self.Hv, self.Dv)
        b, a = self.in_proj_b(x), self.in_proj_a(x)  # [B, T, Hv]
        if use_fused_decode(T, self.decode_path):
            return self.out_proj(self.fused_decode(qkv, z, a, b, cache))

        conv_state = None if cache is None else cache[0]
        if conv_state is None:
            conv_state = mx.zeros((B, self.kernel - 1, qkv.shape[-1]), dtype=qkv.dtype)
        padded = mx.concatenate([conv_state, qkv], axis=1)  # [B, K-1+T, conv_dim]
        mixed = nn.silu(self.conv1d(padded))  # [B, T, conv_dim]
        key_dim = self.Hk * self.Dk
        q = mixed[..., :key_dim].reshape(B, T, self.Hk, self.Dk)
        k = mixed[..., key_dim : 2 * key_dim].reshape(B, T, self.Hk, self.Dk)
        v = mixed[..., 2 * key_dim :].reshape(B, T, self.Hv, self.Dv)

        state = None if cache is None else cache[1]
        every_step = getattr(cache, "keep_steps", False)  # a list works as a cache too
        out, state = gated_delta_update(
            q, k, v, a, b, self.A_log, self.dt_bias, state, all_states=every_step
        )
        if every_step:  # conv inputs and states of each token, to roll back within this call
            cache.steps = (padded, state)
            state = mx.contiguous(state[:, -1])
        if cache is not None:
            # a copy: a view would keep the whole [B, K-1+T, C] prefill buffer alive
            cache[0] = mx.contiguous(padded[:, -(self.kernel - 1) :])
            cache[1] = state
        out = self.norm(out, z)  # [B, T, Hv, Dv]
        return self.out_proj(out.reshape(B, T, -1))

    def fused_decode(self, qkv, z, a, b, cache) -> mx.array:
        """The Metal decode step, conv to gated norm in one dispatch -> [B, 1, value_dim]."""
        conv_state, state = (None, None) if cache is None else (cache[0], cache[1])
        out, state, conv_state = gated_delta_decode(
            qkv,
            z,
            a,
            b,
            self.conv1d.weight,
            self.A_log,
            self.dt_bias,
            self.norm.weight,
            self.norm.eps,
            conv_state,
            state,
            self.Hk,
        )
        if cache is not None:
            cache[0], cache[1] = conv_state, state
        return out


class Attention(nn.Module):
    """Gated full attention: per-head interleaved [query | gate] rows in q_proj."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = hd = config.head_dim
        H = config.hidden_size
        self.q_proj = nn.Linear(H, 2 * self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.rope = Rotary(config)

    def __call__(
        self, x: mx.array, mask=None, cache=None, position_ids=None, rope_delta=0
    ) -> mx.array:
        """position_ids [3, B, T] (M-RoPE) or None: positions cache offset + rope_delta + t."""
        B, T, _ = x.shape
        q_gate = self.q_proj(x).reshape(B, T, self.n_heads, 2 * self.head_dim)
        q, gate = mx.split(q_gate, 2, axis=-1)  # each [B, T, nh, hd]
        q = self.q_norm(q).transpose(0, 2, 1, 3)  # [B, nh, T, hd]
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3)

        if isinstance(cache, RowKVCaches):  # rows at their own offsets: each attends alone
            q, k = self.rope(q, k, cache.positions)
            out = mx.concatenate(
                [
                    self.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], mask, row)
                    for i, row in enumerate(cache.rows)
                ]
            )
        else:
            offset = (0 if cache is None else cache.offset) + rope_delta
            q, k = self.rope(q, k, offset, position_ids)
            out = self.attend(q, k, v, mask, cache)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)  # [B, T, nh*hd]
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, T, -1)))

    def attend(self, q, k, v, mask, cache) -> mx.array:
        """q [B, nh, T, hd], k and v [B, nkv, T, hd] (rotated) appended to `cache` and attended
        -> [B, nh, T, hd]."""
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        quantization = getattr(cache, "quantization", None)  # (group, bits): k, v quantized
        return attention.scaled_dot_product_attention(
            q, k, v, self.head_dim**-0.5, mask, quantization
        )


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_type: str):
        super().__init__()
        self.is_linear = layer_type == LINEAR
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def __call__(
        self, x: mx.array, mask=None, cache=None, position_ids=None, rope_delta=0
    ) -> mx.array:
        normed = self.input_layernorm(x)
        if self.is_linear:
            h = x + self.linear_attn(normed, cache)
        else:
            h = x + self.self_attn(normed, mask, cache, position_ids, rope_delta)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, t) for t in config.layer_types]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(
        self, inputs: mx.array, cache=None, input_embeddings=None, position_ids=None, rope_delta=0
    ) -> mx.array:
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        cache = cache or [None] * len(self.layers)
        # a query sees the cached keys and the new ones up to itself (MLX aligns "causal" to
        # the last key); one query sees every key
        mask = "causal" if h.shape[1] > 1 else None
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache, position_ids, rope_delta)
        return self.norm(h)


class LanguageModel(nn.Module):
    """Decoder plus head; `__call__` returns logits [B, T, vocab]."""

    def __init__(self, config: TextConfig, tie_word_embeddings: bool):
        super().__init__()
        self.config = config
        self.tie_word_embeddings = tie_word_embeddings
        self.model = TextModel(config)
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings=None,
        position_ids=None,
        rope_delta=0,
        return_hidden: bool = False,
    ):
        """Logits [B, T, vocab]; with `return_hidden`, (logits, the final-normed hidden
        states [B, T, H] the head scored), which the MTP head drafts from."""
        h = self.model(inputs, cache, input_embeddings, position_ids, rope_delta)
        logits = self.head(h)
        return (logits, h) if return_hidden else logits

    def head(self, h: mx.array) -> mx.array:
        """Logits [..., vocab] of final-normed hidden states [..., H]."""
        if self.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(
        self, kv_bits: int | None = None, kv_group_size: int = 64, quantized_kv_start: int = 0
    ) -> list:
        return make_layer_caches(self.config, kv_bits, kv_group_size, quantized_kv_start)
