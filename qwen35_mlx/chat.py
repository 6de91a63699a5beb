"""Multi-turn chat that keeps its cache between turns.

Each turn feeds only what the cache lacks: the end of the previous assistant turn and the
new user turn. The history is never reprocessed. The cache holds the
conversation as the model produced it, reasoning included, like llama.cpp's and mlx-lm's chat
(a full re-render of the chat template would drop earlier turns' reasoning, and a DeltaNet
state cannot be rolled back to edit them out).
"""

from __future__ import annotations

from typing import Iterator

from .generate import GenerationResponse, cache_offset, stream_generate



class ChatSession:
    """A conversation with one model.

    Args:
        model, tokenizer: from `qwen35_mlx.load`.
        system_prompt: optional system message for the first turn.
        enable_thinking: None follows the chat template's default for the model size.
        **generation: keyword arguments of `stream_generate` (temp, max_tokens, ...).
    """

    def __init__(self, model, tokenizer, *, system_prompt: str | None = None,
                 enable_thinking: bool | None = None, **generation):
        self.model, self.tokenizer = model, tokenizer
        self.enable_thinking = enable_thinking
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

    def send(self, content: str) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to one user message."""
        user = {"role": "user", "content": content}
        self.messages.append(user)
        if self.tokens:
            text = "\n" + self.tokenizer.apply_chat_template(
                [user], add_generation_prompt=True, enable_thinking=self.enable_thinking)
        else:
            text = self.tokenizer.apply_chat_template(
                self.messages, add_generation_prompt=True, enable_thinking=self.enable_thinking)
        self.tokens.extend(self.tokenizer.encode(text))
        # generate_step queues the next step before its caller sees a stop token, so whether
        # the last sampled token reached the cache is read off the cache, not assumed
        pending = self.tokens[cache_offset(self.cache):]
        answer, reasoning = [], []
        for response in stream_generate(self.model, self.tokenizer, pending, cache=self.cache,
                                        **self.generation):
            self.tokens.append(response.token)
            (reasoning if response.reasoning else answer).append(response.text)
            yield response
        if self.tokens[-1] != self.turn_end:
            self.tokens.append(self.turn_end)
        reply = {"role": "assistant", "content": "".join(answer)}
        if reasoning:
            reply["reasoning_content"] = "".join(reasoning).strip()
        self.messages.append(reply)
