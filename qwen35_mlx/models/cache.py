"""Generation state: a KV cache per full-attention layer, conv + recurrent state per DeltaNet layer.

Uses mlx-lm's cache classes so its prompt-cache utilities (save/load, trimming checks) work:
`KVCache` for attention; `ArraysCache(2)` for DeltaNet holding
  [0] conv state      [B, K-1, conv_dim]  (the last K-1 projected inputs, activation dtype)
  [1] recurrent state [B, Hv, Dv, Dk]     (float32 even for bf16 models, as transformers)
"""

from __future__ import annotations

from mlx_lm.models.cache import ArraysCache, KVCache

from .config import LINEAR, TextConfig


def make_cache(config: TextConfig) -> list:
    return [ArraysCache(2) if t == LINEAR else KVCache() for t in config.layer_types]

