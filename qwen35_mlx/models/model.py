"""The whole Qwen3.5 model as users load it: the text decoder, for multimodal checkpoints the
vision tower, and where the checkpoint has one the MTP head (`mtp`, docs/ARCHITECTURE.md §6).

A prompt with images or videos runs as: `encode_vision` (pixels -> features), `embed_inputs`
(features scattered at the placeholder tokens), `position_ids` (M-RoPE), then `__call__`
with `input_embeddings` and `position_ids`; decoding continues with `rope_delta`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .deferred import DeferredWeights
from .mtp import MTPHead
from .positions import rope_index
from .state import PromptCache, make_prompt_cache
from .text import LanguageModel
from .vision import VisionModel

QUANT_RECIPES = ("hybrid", "uniform")
# Decoder and MTP weights kept float32 whatever the model dtype: norms (the (1+w) ones hold the
# shifted weight, docs/ARCHITECTURE.md §2.2) and A_log.
FLOAT32_WEIGHTS = ("norm.weight", "norm_embedding.weight", "norm_hidden.weight", "A_log")


class Model(nn.Module):
    def __init__(self, config: ModelConfig, mtp: bool = False):
        """`mtp`: build the MTP head (a checkpoint says so by holding `mtp.*` tensors)."""
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text, config.tie_word_embeddings)
        self.vision_tower = None if config.vision is None else VisionModel(config.vision)
        self.mtp = MTPHead(config.text) if mtp else None
        # what snapshots of its caches are tied to; `load` adds the weights' identity
        self.fingerprint = hashlib.sha256(
            json.dumps(config.raw, sort_keys=True).encode()
        ).hexdigest()
        self._deferred_vision: DeferredWeights | None = None  # see defer_vision_weights

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings=None,
        position_ids=None,
        rope_delta: int | mx.array = 0,
        check_ids: bool = True,
        return_hidden: bool = False,
    ):
        """Logits [B, T, vocab]; with `return_hidden`, (logits, final-normed hidden [B, T, H]).

        Args:
            inputs: [B, T] token ids (ignored where `input_embeddings` [B, T, H] is given).
                Ids outside the vocabulary are a ValueError unless `check_ids` is False (as
                for the sampled tokens fed back while decoding: the check reads the ids).
            cache: from `make_cache()`, updated in place.
            position_ids: [3, B, T] M-RoPE positions (from `position_ids()`, sliced along T
                for a prefill chunk). None: cache offset + rope_delta + t on all three rows,
                as for text and for decoding after a multimodal prompt.
            rope_delta: int or [B], from `position_ids()`; 0 for text-only prompts.
        """
        if check_ids and input_embeddings is None:
            self.check_token_ids(inputs)
        return self.language_model(
            inputs, cache, input_embeddings, position_ids, rope_delta, return_hidden
        )

    def check_token_ids(self, ids) -> None:
        """ValueError for an id outside [0, vocab_size): the embedding lookup does not check,
        and would read memory outside the table."""
        import numpy as np  # imported where used: it costs ~0.2 s at start-up

        vocab = self.config.text.vocab_size
        ids = np.asarray(ids)
        outside = np.argwhere((ids < 0) | (ids >= vocab))
        if outside.size:
            where = tuple(outside[0])
            raise ValueError(
                f"token id {int(ids[where])} at position {where[-1]} is outside "
                f"the model's vocabulary [0, {vocab}); the ids come from another "
                "tokenizer or model"
            )

    def encode_vision(self, pixel_values: mx.array, grid_thw) -> mx.array:
        """Vision features [N_features, H] for the patches of images or videos.

        Args:
            pixel_values: [N_patches, C*Tp*P*P] from the image or video processor.
            grid_thw: [n, 3] (t, h, w) in patches per image / video.
        """
        if self.vision_tower is None:
            raise ValueError(
                "this checkpoint has no vision tower (a text-only model); load a "
                "Qwen3.5 checkpoint with its vision weights to pass images or videos"
            )
        if self._deferred_vision is not None:
            self._deferred_vision.materialise()
        return self.vision_tower(pixel_values, grid_thw)

    def embed_inputs(
        self,
        input_ids: mx.array,
        image_features: mx.array | None = None,
        video_features: mx.array | None = None,
    ) -> mx.array:
        """Token embeddings [B, T, H] with vision features at the placeholder tokens, in order
        (row by row over the batch)."""
        import numpy as np

        self.check_token_ids(input_ids)
        embeddings = self.language_model.model.embed_tokens(input_ids)
        B, T, H = embeddings.shape
        flat = embeddings.reshape(B * T, H)
        ids = np.asarray(input_ids).reshape(-1)
        for kind, features in (("image", image_features), ("video", video_features)):
            token = self.config.token_ids.get(f"{kind}_token_id")
            places = np.flatnonzero(ids == token) if token is not None else np.zeros(0, int)
            count = 0 if features is None else features.shape[0]
            if len(places) != count:
                raise ValueError(
                    f"input_ids has {len(places)} {kind} placeholder tokens but {count} {kind} "
                    "features were given; each image/video needs exactly as many placeholders as "
                    "its features (grid t*h*w / merge**2): build the prompt with the processor"
                )
            if count:
                flat[mx.array(places)] = features.astype(flat.dtype)
        return flat.reshape(B, T, H)

    def position_ids(
        self, input_ids: mx.array, image_grid_thw=None, video_grid_thw=None
    ) -> tuple[mx.array, mx.array | int]:
        """(position_ids [3, B, T], rope_delta [B]) of a prompt; rope_delta is 0 and the
        positions plain 0..T-1 when there are no grids."""
        if image_grid_thw is None and video_grid_thw is None:
            B, T = input_ids.shape
            return mx.broadcast_to(mx.arange(T, dtype=mx.int32), (3, B, T)), 0
        if self.config.vision is None:
            raise ValueError("image/video grids given to a text-only model (no vision tower)")
        ids = self.config.token_ids
        return rope_index(
            input_ids,
            image_grid_thw,
            video_grid_thw,
            image_token_id=ids["image_token_id"],
            video_token_id=ids["video_token_id"],
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )

    def mtp_logits(
        self,
        hidden: mx.array,
        next_ids: mx.array,
        cache: list | None = None,
        position_ids: mx.array | None = None,
        rope_delta: int | mx.array = 0,
    ) -> mx.array:
        """The MTP head's logits [B, T, vocab] for the tokens two ahead: `hidden` [B, T, H] the
        final-normed hidden states at positions t (`__call__` with `return_hidden`), `next_ids`
        [B, T] the tokens at t + 1; positions as `MTPHead.__call__` takes them."""
        if self.mtp is None:
            raise ValueError("this checkpoint has no MTP head (no mtp.* tensors)")
        embeddings = self.language_model.model.embed_tokens(next_ids)
        drafted = self.mtp(hidden, embeddings, cache, position_ids, rope_delta)
        return self.language_model.head(drafted)

    def defer_vision_weights(self, read: Callable[[], Mapping[str, mx.array]]) -> None:
        """Evaluate the vision tower's weights on its first use, not at load (`DeferredWeights`:
        `read()` gives them under the tower's own names)."""
        self._deferred_vision = DeferredWeights(self.vision_tower, read)

    @property
    def layers(self) -> list:
        return self.language_model.model.layers

    def make_cache(
        self, kv_bits: int | None = None, kv_group_size: int = 64, quantized_kv_start: int = 0
    ) -> PromptCache:
        """An empty cache for one conversation (a cache per layer, the tokens they hold);
        kv_bits 4 or 8 quantizes keys and values (models/cache.py)."""
        return make_prompt_cache(
            self.config.text, self.fingerprint, kv_bits, kv_group_size, quantized_kv_start
        )

    @staticmethod
    def quant_predicate(
        recipe: str, bits: int, group_size: int, *, vision: bool = False, mtp: bool = False
    ) -> Callable:
        """Decides per module, for `nn.quantize`: False keeps it float, True quantizes it at
        `bits`, a dict overrides the bits (written per layer into the config).

        "uniform": every matrix at `bits`. "hybrid" (default): the DeltaNet per-head gate
        projections `in_proj_a`/`in_proj_b` stay float ([Hv, H]: tiny, and they set decay and
        update rates), `linear_attn.out_proj` (the most quantization-sensitive tensor in
        published per-tensor studies of the 9B) gets 8 bits, the rest `bits`. Norms, A_log,
        dt_bias and conv1d are not matrices and are never quantized. The vision tower's
        matrices stay float unless `vision`, then at `bits`; its learned position table
        (read as a grid and resampled) and its patch embedding (Conv3d) never. The MTP head's
        matrices stay float unless `mtp`, then at `bits`.
        """
        if recipe not in QUANT_RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {QUANT_RECIPES}")

        def predicate(path: str, module) -> bool | dict:
            if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
                return False  # input dims must split into whole groups
            if path.startswith("vision_tower."):
                return vision and not path.endswith("pos_embed")
            if path.startswith("mtp."):
                return mtp
            if recipe == "uniform":
                return True
            if path.endswith(("linear_attn.in_proj_a", "linear_attn.in_proj_b")):
                return False
            if path.endswith("linear_attn.out_proj") and bits < 8:
                return {"group_size": group_size, "bits": 8}
            return True

        return predicate

    @staticmethod
    def cast_predicate(name: str) -> bool:
        """Whether a weight follows the model dtype; the decoder's norms and A_log stay
        float32, the MTP head's included (the vision tower's LayerNorms hold plain weights and
        follow the dtype)."""
        if name.startswith("vision_tower."):
            return True
        return not name.endswith(FLOAT32_WEIGHTS)
