"""Multi-turn chat, rendered whole through the chat template every turn, as a stateless client
would send it, and continued from the longest cached prefix.

Each turn renders the whole conversation, so earlier turns' reasoning is dropped exactly as the
template drops it and the model sees what transformers (or any client that resends the
history) would give it. The prefix cache makes that cheap: a turn feeds the new message and the
re-rendered end of the last reply, never the history. Editing, deleting or regenerating a
message is rolling back to an earlier snapshot: change `messages` and call `reply()`, or use
`undo()` and `retry()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from .generate import GenerationResponse, stream_generate
from .prompt import VisionCache, with_media
from .prompt_cache import PrefixCache


class ChatSession:
    """A conversation with one model.

    Args:
        model, tokenizer: from `qwen35_mlx.load`.
        system_prompt: optional system message.
        enable_thinking: None follows the chat template's default for the model size.
        vision_cache: encoded images and videos (a new one by default), so that showing an
            image again does not run the vision tower again.
        prompt_cache: the `PrefixCache` turns continue from (a new one by default; share one
            to resume conversations, e.g. one with a disk folder across runs).
        **generation: keyword arguments of `stream_generate` (temp, max_tokens, ...).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system_prompt: str | None = None,
        enable_thinking: bool | None = None,
        vision_cache: VisionCache | None = None,
        prompt_cache: PrefixCache | None = None,
        **generation,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.enable_thinking = enable_thinking
        self.vision_cache = VisionCache() if vision_cache is None else vision_cache
        self.prompt_cache = PrefixCache() if prompt_cache is None else prompt_cache
        self.generation = generation
        self.system_prompt = system_prompt
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (cached prefixes stay, for a conversation that returns)."""
        self.messages: list[dict] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        )

    def send(
        self, content: str | Sequence[Mapping], images=None, videos=None
    ) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to one user message.

        Args:
            content: the message text, or a content list with image and video items (as
                `stream_generate`'s messages).
            images, videos: paths (or PIL images, bytes) shown before the content.
        """
        user = {"role": "user", "content": with_media(content, images, videos)}
        return self._reply([*self.messages, user])

    def reply(self) -> Iterator[GenerationResponse]:
        """Stream a reply to `messages` as they are (after editing or deleting some)."""
        if not self.messages or self.messages[-1].get("role") != "user":
            raise ValueError(
                "the conversation must end with a user message to reply to; send() one"
            )
        return self._reply(list(self.messages))

    def retry(self) -> Iterator[GenerationResponse]:
        """Replace the last reply with a new one."""
        if not self.messages or self.messages[-1].get("role") != "assistant":
            raise ValueError("there is no reply to retry yet; send() a message first")
        return self._reply(self.messages[:-1])

    def undo(self) -> dict | None:
        """Take back the last user message and the reply to it; returns that message."""
        users = [i for i, m in enumerate(self.messages) if m.get("role") == "user"]
        if not users:
            return None
        removed = self.messages[users[-1]]
        del self.messages[users[-1] :]
        return removed

    def _reply(self, messages: list[dict]) -> Iterator[GenerationResponse]:
        responses = stream_generate(
            self.model,
            self.tokenizer,
            messages,
            enable_thinking=self.enable_thinking,
            vision_cache=self.vision_cache,
            prompt_cache=self.prompt_cache,
            **self.generation,
        )
        answer, reasoning, started = [], [], False
        try:
            for response in responses:
                if not started:  # the prompt was read: a bad file leaves no trace
                    self.messages, started = messages, True
                (reasoning if response.reasoning else answer).append(response.text)
                yield response
        finally:  # also when the caller stops reading: the reply so far ends the turn
            if started:
                reply = {"role": "assistant", "content": "".join(answer)}
                if reasoning:
                    reply["reasoning_content"] = "".join(reasoning).strip()
                self.messages.append(reply)
