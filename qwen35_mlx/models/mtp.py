"""The multi-token-prediction (MTP) head every Qwen3.5 checkpoint carries (docs/ARCHITECTURE.md
§6): from the main model's final-normed hidden state at t and the embedding of the token at
t + 1 it gives a hidden state the main model's head scores as the token at t + 2.

    u = fc( rmsnorm_emb(embed(x_{t+1})) ‖ rmsnorm_hid(h_t) )      (embedding first)
    out = mtp.norm( full-attention decoder layer(s)(u) )          (own KV cache, same positions)

Maths from vLLM's `qwen3_5_mtp.py` / `qwen3_next_mtp.py` (transformers has no MTP code). The
module tree keeps the checkpoint's names under `mtp.`; all its norms are (1+w) norms held
shifted, as the decoder's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import FULL, TextConfig
from .deferred import DeferredWeights
from .text import DecoderLayer, RMSNorm


class MTPHead(nn.Module):
    """fc over [embedding ‖ hidden], full-attention decoder layer(s), final norm (§6.2)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = RMSNorm(H, eps)
        self.pre_fc_norm_hidden = RMSNorm(H, eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = [DecoderLayer(config, FULL) for _ in range(config.mtp_num_hidden_layers)]
        self.norm = RMSNorm(H, eps)
        self._deferred: DeferredWeights | None = None  # see defer_weights

    def __call__(
        self,
        hidden: mx.array,
        embeddings: mx.array,
        cache: list | None = None,
        position_ids: mx.array | None = None,
        rope_delta: int | mx.array = 0,
    ) -> mx.array:
        """Hidden states [B, T, H] after mtp.norm; score them with `LanguageModel.head`.

        Args:
            hidden: [B, T, H] the main model's final-normed hidden states at positions t
                (what its head scores; `Model.__call__` with `return_hidden`).
            embeddings: [B, T, H] the main model's embeddings of the tokens at t + 1.
            cache: from `make_cache()`, updated in place; the pair (h_t, x_{t+1}) sits at
                position t, so a cache fed from the start holds t pairs.
            position_ids: [3, B, T] M-RoPE positions as the main model takes them. None:
                cache offset + rope_delta + i on all three rows.
            rope_delta: int or [B], as for the main model.
        """
        if self._deferred is not None:
            self._deferred.materialise()
            self._deferred = None
        joined = mx.concatenate(
            [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
        )  # [B, T, 2H]
        h = self.fc(joined)  # [B, T, H]
        cache = cache or [None] * len(self.layers)
        mask = "causal" if h.shape[1] > 1 else None  # as TextModel: aligned to the last key
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache, position_ids, rope_delta)
        return self.norm(h)

    def make_cache(self) -> list:
        """One KVCache per MTP layer."""
        return [KVCache() for _ in self.layers]

    def defer_weights(self, read: Callable[[], Mapping[str, mx.array]]) -> None:
        """Evaluate the head's weights on its first call, not at load (`DeferredWeights`:
        `read()` gives them under the head's own names)."""
        self._deferred = DeferredWeights(self, read)
