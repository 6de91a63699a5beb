"""Multi-turn chat that keeps its cache between turns.

Each turn feeds only what the cache lacks: the end of the previous assistant turn and the
new user turn, with its images and videos. The history is never reprocessed: images shown
earlier stay in the cache, which carries the M-RoPE position shift they cause from turn to
turn. The cache holds the conversation as the model produced it, reasoning included, like
llama.cpp's and mlx-lm's chat (a full re-render of the chat template drops earlier turns'
reasoning).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

from .generate import GenerationResponse, stream_generate
from .prompt import VisionCache, encode_prompt, media_sources, with_media


class ChatSession:
    """A conversation with one model.

    Args:
        model, tokenizer: from `qwen35_mlx.load`.
        system_prompt: optional system message for the first turn.
        enable_thinking: None follows the chat template's default for the model size.
        vision_cache: encoded images and videos, kept across turns and resets (a new one by
            default), so showing an image again does not run the vision tower again.
        **generation: keyword arguments of `stream_generate` (temp, max_tokens, ...).
    """

    def __init__(self, model, tokenizer, *, system_prompt: str | None = None,
                 enable_thinking: bool | None = None, vision_cache: VisionCache | None = None,
                 **generation):
        self.model, self.tokenizer = model, tokenizer
        self.enable_thinking = enable_thinking
        self.vision_cache = VisionCache() if vision_cache is None else vision_cache
        self.generation = generation
        self.system_prompt = system_prompt
        (self.turn_end,) = tokenizer.encode("<|im_end|>")
        self.reset()

    def reset(self) -> None:
        """Forget the conversation."""
        self.cache = self.model.make_cache()
        self.messages: list[dict] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        self.tokens: list[int] = []  # the conversation so far; the cache holds a prefix

    def send(self, content: str | Sequence[Mapping], images=None,
             videos=None) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to one user message.

        Args:
            content: the message text, or a content list with image and video items (as
                `stream_generate`'s messages).
            images, videos: paths (or PIL images, bytes) shown before the content.
        """
        user = {"role": "user", "content": with_media(content, images, videos)}
        turn = [user] if self.tokens else [*self.messages, user]
        text = self.tokenizer.apply_chat_template(
            turn, add_generation_prompt=True, enable_thinking=self.enable_thinking)
        # generate_step queues the next step before its caller sees a stop token, so whether
        # the last sampled token reached the cache is read off the cache, not assumed
        pending = self.tokens[self.cache.offset:]
        inputs = encode_prompt(self.model, self.tokenizer, ("\n" if self.tokens else "") + text,
                               *media_sources(turn), prefix=pending,
                               vision_cache=self.vision_cache)
        self.messages.append(user)  # once its images are read: a bad file leaves no trace
        self.tokens.extend(inputs.ids[len(pending):])
        answer, reasoning = [], []
        try:
            for response in stream_generate(self.model, self.tokenizer, inputs, cache=self.cache,
                                            **self.generation):
                self.tokens.append(response.token)
                (reasoning if response.reasoning else answer).append(response.text)
                yield response
        finally:  # also when the caller stops reading: the reply so far ends the turn
            if self.tokens[-1] != self.turn_end:
                self.tokens.append(self.turn_end)
            reply = {"role": "assistant", "content": "".join(answer)}
            if reasoning:
                reply["reasoning_content"] = "".join(reasoning).strip()
            self.messages.append(reply)
