"""Prompts, from what a caller gives to what the model takes: the one place a prompt is built.

A prompt is text (used as is), token ids, or chat messages (rendered by the checkpoint's chat
template). Messages carry images and videos as OpenAI-style content items: the chat template
renders each as a `<|vision_start|>…<|vision_end|>` placeholder, the processor expands the
placeholders (one token per merged 2×2 patch block, timestamps per video frame group), and the
vision tower's features replace those tokens' embeddings; M-RoPE positions follow
docs/ARCHITECTURE.md §3. Features are kept in a small LRU (`VisionCache`) keyed by the pixels, so
showing the same image again does not run the tower again.

Token ids are plain `list[int]` here and everywhere above the model; `PromptInputs` carries
them with the embeddings and positions, and `place` puts a prompt after what a cache holds.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .tool_calls import template_messages, template_tools

if TYPE_CHECKING:  # numpy is imported where it is used: it costs ~0.2 s at start-up
    import numpy as np

CONTENT_TYPES = ("text", "image", "image_url", "video")


@dataclass
class PromptInputs:
    """A prompt ready for the model (what `stream_generate` makes of any prompt).

    ids: token ids, vision placeholders expanded.
    input_embeddings: [1, T, H] embeddings with vision features in place; None for text.
    position_ids: [3, 1, T] M-RoPE positions counted from 0; None for text (positions = arange).
    rope_delta: max position + 1 - T (<= 0); decode steps after this prompt add it to theirs.
    keys: the ids as prefix-cache keys: each image's or video's placeholder tokens carry a
        hash of its pixels instead (None: the ids themselves).
    """

    ids: list[int]
    input_embeddings: mx.array | None = None
    position_ids: mx.array | None = None
    rope_delta: int = 0
    keys: list[int] | None = None


Prompt = str | Sequence[int] | Sequence[Mapping] | PromptInputs


def place(inputs: PromptInputs, cached: int, rope_delta: int) -> tuple[mx.array | None, int]:
    """Positions of a prompt that follows `cached` tokens whose images and videos shift M-RoPE
    positions by `rope_delta`: (position_ids [3, 1, T] or None for plain positions, the shift
    that decoding after the prompt continues with)."""
    positions = inputs.position_ids
    if positions is not None:
        positions = positions + cached + rope_delta
    return positions, rope_delta + inputs.rope_delta


def prompt_tokens(
    tokenizer, prompt, enable_thinking: bool | None = None, tools: Sequence[Mapping] | None = None
) -> list[int]:
    """A prompt as token ids: text is used as is, a list of messages goes through the chat
    template (with a generation prompt and `tools`), and ids pass through."""
    if tools and not is_messages(prompt):
        raise ValueError(
            "tools are shown to the model by the chat template, which only chat messages go "
            "through; give the prompt as [{'role': 'user', 'content': ...}]"
        )
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if is_messages(prompt):
        return tokenizer.encode(chat_text(tokenizer, prompt, enable_thinking, tools))
    return token_ids(prompt)


def token_ids(prompt) -> list[int]:
    """Ids given by a caller (a list, tuple, numpy or MLX array of whole numbers) as a list."""
    import numpy as np

    if isinstance(prompt, (list, tuple)) and not prompt:
        return []
    if isinstance(prompt, (list, tuple, mx.array, np.ndarray)):
        array = np.asarray(prompt)
        if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
            return array.tolist()
    raise ValueError(
        f"a prompt is text, a list of token ids or a list of chat messages "
        f"({{'role': 'user', 'content': ...}}); got {_describe(prompt)}"
    )


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {', '.join(kinds)}"
    return f"a {type(value).__name__}"


def prepare_prompt(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    images=None,
    videos=None,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping] | None = None,
    vision_cache: VisionCache | None = None,
) -> PromptInputs:
    """Any prompt as model inputs, its ids checked against the model's vocabulary; the images
    and videos of messages (and of `images=`, `videos=`) go through the processor and the
    vision tower. See `stream_generate`."""
    images, videos = as_list(images), as_list(videos)
    if isinstance(prompt, PromptInputs):
        if images or videos:
            raise ValueError("the prompt is already prepared; put its images in it")
        inputs = prompt
    elif images or videos or is_messages(prompt):
        messages = attach_media(prompt, images, videos) if images or videos else prompt
        inputs = encode_prompt(
            model,
            tokenizer,
            chat_text(tokenizer, messages, enable_thinking, tools),
            *media_sources(messages),
            vision_cache=vision_cache,
        )
    else:
        inputs = PromptInputs(prompt_tokens(tokenizer, prompt, tools=tools))
    model.check_token_ids(inputs.ids)
    return inputs


def is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], Mapping)


def chat_text(
    tokenizer,
    messages: Sequence[Mapping],
    enable_thinking: bool | None,
    tools: Sequence[Mapping] | None = None,
) -> str:
    """Messages and tools through the chat template, tool calls' JSON-string arguments read
    (docs/ARCHITECTURE.md §13)."""
    return tokenizer.apply_chat_template(
        template_messages(messages),
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
        tools=template_tools(tools),
    )


class VisionCache:
    """The vision tower's features of recent images and videos, least recently used dropped
    first, keyed by a hash of the processed pixels and grid. Use one cache per model.

    Args:
        max_entries: most images/videos kept (a 1024×1024 image is 1024 features of the
            model's hidden size).
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._features: OrderedDict[str, mx.array] = OrderedDict()

    def __len__(self) -> int:
        return len(self._features)

    def clear(self) -> None:
        self._features.clear()

    def encode(
        self, model, pixel_values: np.ndarray, grid_thw: np.ndarray, key: str | None = None
    ) -> mx.array:
        """Features [N, H] of one image or video (pixel_values [P, 1536], grid_thw [1, 3]);
        `key`: its `content_key`, when already computed."""
        key = key or content_key(pixel_values, grid_thw)
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        features = model.encode_vision(mx.array(pixel_values), mx.array(grid_thw))
        mx.eval(features)  # cache values, not graphs holding the pixels
        self._features[key] = features
        if len(self._features) > self.max_entries:
            self._features.popitem(last=False)
        return features


def content_key(pixel_values: np.ndarray, grid_thw: np.ndarray) -> str:
    """A hash of one image's or video's processed pixels and grid."""
    import numpy as np

    return hashlib.sha256(
        np.ascontiguousarray(grid_thw, dtype=np.int64).tobytes()
        + np.ascontiguousarray(pixel_values).tobytes()
    ).hexdigest()


def media_keys(ids: Sequence[int], placeholders: Mapping[int, list[tuple[str, int]]]) -> list[int]:
    """Prefix-cache keys of `ids`: each placeholder token keyed by its medium's content hash.

    Args:
        placeholders: placeholder token id -> (content hash, tokens) of each of its media, in
            prompt order.
    """
    queues = {
        token: [(-1 - int(digest[:15], 16), count) for digest, count in media]
        for token, media in placeholders.items()
    }
    keys = []
    for token in ids:
        queue = queues.get(token)
        if not queue:
            keys.append(token)
            continue
        key, left = queue[0]
        keys.append(key)
        queue[0] = (key, left - 1)
        if left == 1:
            queue.pop(0)
    return keys


def as_list(sources) -> list:
    """`images=`/`videos=` as a list: None is none, a single path or image is one."""
    if sources is None:
        return []
    return list(sources) if isinstance(sources, (list, tuple)) else [sources]


def with_media(content: str | Sequence[Mapping], images=None, videos=None) -> str | list:
    """A user message's content with `images` then `videos` put before it (the simple form)."""
    items = [{"type": "image", "image": image} for image in as_list(images)] + [
        {"type": "video", "video": video} for video in as_list(videos)
    ]
    if not items:
        return content
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    return items + text


def attach_media(prompt: str | Sequence[Mapping], images=None, videos=None) -> list[dict]:
    """The simple form as messages: a text prompt becomes a user message; with a list of
    messages, the images and videos go before the last user message's content."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": with_media(prompt, images, videos)}]
    if not prompt or not isinstance(prompt[0], Mapping):
        raise ValueError(
            "images and videos need a text or chat-messages prompt: token ids "
            "cannot say where they go"
        )
    messages = [dict(message) for message in prompt]  # the caller's messages stay as they were
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not users:
        raise ValueError(
            "images and videos are attached to the last user message, and the "
            "prompt has none; add one"
        )
    last = messages[users[-1]]
    last["content"] = with_media(last.get("content") or [], images, videos)
    return messages


def media_sources(messages: Sequence[Mapping]) -> tuple[list, list]:
    """The images and `VideoSource`s of chat messages, each list in prompt order (the order in
    which the chat template renders their placeholders)."""
    from .sources import local_source  # here: PIL is needed for images only

    images, videos = [], []
    for message in messages:
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        for item in content:
            kind = item_type(item)
            if kind == "image":
                images.append(local_source(item["image"]))
            elif kind == "image_url":
                url = item["image_url"]
                images.append(local_source(url.get("url") if isinstance(url, Mapping) else url))
            elif kind == "video":
                videos.append(VideoSource(local_source(item["video"]), video_fps(item)))
    return images, videos


@dataclass(frozen=True)
class VideoSource:
    """A video of a prompt: what to read, and its frame rate when the item gives one."""

    source: Any
    fps: float | None = None  # frames per second of the source (a frames folder's rate)


def video_fps(item: Mapping) -> float | None:
    """A video item's "fps" (or "source_fps"): the rate its frames were taken at (checked
    where the frames are opened)."""
    return item.get("fps", item.get("source_fps"))


def item_type(item: Any) -> str:
    """A content item's kind, decided as the chat template decides it (by key, then type)."""
    if not isinstance(item, Mapping):
        raise ValueError(
            f"content item {item!r} is not a dict; write "
            "{'type': 'text', 'text': ...} or {'type': 'image', 'image': PATH}"
        )
    for kind in ("image", "image_url", "video", "text"):
        if kind in item:
            return kind
    raise ValueError(
        f"content item {dict(item)!r} has none of the keys {CONTENT_TYPES}; write "
        "e.g. {'type': 'image', 'image': 'photo.png'}"
    )


def encode_prompt(
    model,
    tokenizer,
    text: str,
    images: Sequence = (),
    videos: Sequence = (),
    *,
    prefix: Sequence[int] = (),
    vision_cache: VisionCache | None = None,
) -> PromptInputs:
    """Prompt text whose `<|image_pad|>` / `<|video_pad|>` placeholders stand for `images` and
    `videos` (`VideoSource`s, in order) -> model inputs. `prefix` ids go before the text as
    they are."""
    import numpy as np

    if not images and not videos:
        return PromptInputs([*prefix, *tokenizer.encode(text)])
    processor = vision_processor(model, tokenizer)
    vision_cache = VisionCache() if vision_cache is None else vision_cache
    image_inputs = processor.images(list(images)) if images else None
    video_inputs = [processor.video(video.source, source_fps=video.fps) for video in videos]
    image_grid = None if image_inputs is None else image_inputs.grid_thw
    video_grid = np.concatenate([v.grid_thw for v in video_inputs]) if video_inputs else None
    expanded = processor.expand(text, image_grid_thw=image_grid, videos=video_inputs)
    ids = [*prefix, *tokenizer.encode(expanded)]

    images = [(*m, content_key(*m)) for m in split_images(image_inputs)]
    videos = [
        (v.pixel_values, v.grid_thw, content_key(v.pixel_values, v.grid_thw)) for v in video_inputs
    ]
    image_features = [vision_cache.encode(model, *m) for m in images]
    video_features = [vision_cache.encode(model, *m) for m in videos]
    merged = processor.merge_size**2  # patches per placeholder token
    tokens = mx.array(ids)[None]  # [1, T]
    embeddings = model.embed_inputs(
        tokens,
        image_features=mx.concatenate(image_features) if image_features else None,
        video_features=mx.concatenate(video_features) if video_features else None,
    )
    positions, rope_delta = model.position_ids(
        tokens, image_grid_thw=image_grid, video_grid_thw=video_grid
    )
    token_ids = model.config.token_ids
    keys = media_keys(
        ids,
        {
            token_ids[f"{kind}_token_id"]: [
                (key, int(np.prod(grid)) // merged) for _, grid, key in media
            ]
            for kind, media in (("image", images), ("video", videos))
        },
    )
    return PromptInputs(
        ids, embeddings, positions, int(np.asarray(rope_delta).reshape(-1)[0]), keys
    )


def split_images(inputs) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pixel_values [P_i, 1536], grid_thw [1, 3]) per image of the processor's ImageInputs."""
    import numpy as np

    if inputs is None:
        return []
    ends = np.cumsum(np.prod(inputs.grid_thw, axis=1))[:-1]
    return list(zip(np.split(inputs.pixel_values, ends), inputs.grid_thw[:, None]))


def vision_processor(model, tokenizer):
    if model.vision_tower is None:
        raise ValueError(
            "this checkpoint is text-only (no vision tower), so it cannot read images or "
            "videos; load a multimodal Qwen3.5 checkpoint (Qwen3_5ForConditionalGeneration, "
            "e.g. Qwen/Qwen3.5-0.8B)"
        )
    if tokenizer.processor is None:
        raise ValueError(
            "the tokenizer carries no image processor; load model and tokenizer with "
            "qwen35_mlx.load, which reads the checkpoint's preprocessor_config.json"
        )
    return tokenizer.processor
