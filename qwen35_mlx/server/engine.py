"""The engine: one thread that owns the model, the tokenizer and the caches, and runs requests.

HTTP handlers never touch MLX: they submit a `GenerationRequest` (plain data) and read `Event`s
(plain data) from the returned `Handle`, an async iterator fed from the engine thread. The worker
serves every running request at once with a `BatchGenerator` (continuous batching,
docs/ARCHITECTURE.md §10.1): new requests join between decode steps, finished and cancelled
ones leave; `Engine._work` is the one place that decides how requests are scheduled
(docs/ARCHITECTURE.md §15).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

import mlx.core as mx

from ..batch import BatchGenerator
from ..constrained import tool_call_grammar
from ..generate import GenerationResponse
from ..prompt import VisionCache
from ..prompt_cache import PrefixCache
from ..tokenizer import THINK_CLOSE

log = logging.getLogger("qwen35_mlx.server")


@dataclass(frozen=True)
class GenerationRequest:
    """What one HTTP request asks of the model, in `stream_generate`'s terms.

    prompt: chat messages (OpenAI style, image items included) or text used as is.
    tools: OpenAI-form tool definitions the chat template shows the model (calls are read
        from the answer text by the HTTP side, `qwen35_mlx.tool_calls`).
    tool_choice: OpenAI's "auto", "required" or {"type": "function", "function": {"name":
        ...}}; the last two are enforced by constrained decoding.
    response_format: OpenAI's, enforced by constrained decoding.
    top_logprobs: None for no log-probabilities; n >= 0 for the chosen token's and the n most
        likely ones' at each step.
    """

    prompt: str | Sequence[Mapping]
    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    enable_thinking: bool | None = None
    tools: Sequence[Mapping] | None = None
    tool_choice: str | Mapping = "auto"
    response_format: Mapping | None = None
    top_logprobs: int | None = None

    def generation_kwargs(self) -> dict:
        """The `stream_generate` keyword arguments (everything but the prompt)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        del kwargs["prompt"], kwargs["top_logprobs"], kwargs["tool_choice"]
        kwargs["stop"] = list(self.stop)
        kwargs["constraint"] = tool_call_grammar(self.tools or (), self.tool_choice)
        return kwargs


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens restored from the prefix cache


@dataclass(frozen=True)
class Event:
    """One generated token: its text (empty while a character is incomplete), whether it is
    reasoning, the usage so far, and on the last event the finish reason.

    logprob: for answer tokens when asked (not for reasoning, `</think>` or the stop token).
    stop_sequence: the stop string that ended the answer, on the last event.
    """

    text: str
    reasoning: bool
    token: int
    usage: Usage
    logprob: TokenLogprob | None = None
    top_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last event
    stop_sequence: str | None = None


class QueueFullError(Exception):
    """The engine holds as many requests as it accepts; try again later (HTTP 429)."""


_DONE = object()


class Handle:
    """A submitted request: iterate it (async) for its `Event`s; `cancel()` stops generation
    at the next token. An error in the request (a `ValueError` for bad input) is raised by the
    iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._finished = False
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, item) -> None:
        """From the engine thread: an Event, or the exception that ends the request."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is reading
            self.cancel()

    def close(self) -> None:
        """From the engine thread: the request has no more events."""
        self.put(_DONE)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        item = await self._events.get()
        if item is _DONE:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item


class Engine:
    """Runs requests on one thread that owns the model and its caches.

    Args:
        model, tokenizer: from `qwen35_mlx.load`.
        max_queue: most requests accepted at once (running or waiting); `submit` raises
            QueueFullError beyond it.
        max_batch: most requests generating at once (one decode step for all); the rest of
            the accepted ones wait their turn.
        prefix_cache: kept across requests, so a resent history costs only its new tokens.
        vision_cache: encoded images kept across requests.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_queue: int = 16,
        max_batch: int = 8,
        prefix_cache: PrefixCache | None = None,
        vision_cache: VisionCache | None = None,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self.prefix_cache = PrefixCache() if prefix_cache is None else prefix_cache
        self.vision_cache = VisionCache() if vision_cache is None else vision_cache
        self._batch = BatchGenerator(
            model,
            tokenizer,
            prompt_cache=self.prefix_cache,
            max_batch=max_batch,
            vision_cache=self.vision_cache,
        )
        # uid -> (the request, its handle, its answer text so far by token)
        self._running: dict[int, tuple[GenerationRequest, Handle, list[str]]] = {}
        self._requests: queue.Queue = queue.Queue()
        self._accepted = 0
        self.tokens_generated = 0  # by all requests, cancelled ones included
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="qwen35-mlx-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def accepted(self) -> int:
        """Requests running or waiting."""
        return self._accepted

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue `request` (call from a running event loop); QueueFullError when full."""
        handle = Handle(asyncio.get_running_loop())
        with self._lock:
            if self._accepted >= self.max_queue:
                raise QueueFullError(
                    f"the server holds {self._accepted} requests, its limit (--max-queue); "
                    "retry later"
                )
            self._accepted += 1
        self._requests.put((request, handle))
        return handle

    def _serve(self) -> None:
        try:
            self._work()
        finally:  # MLX asks threads to free their streams: else the process may abort at exit
            mx.clear_streams()

    def _work(self) -> None:
        """Between decode steps: admit what was submitted, drop what was cancelled; then one
        step for every running request. Waits for submissions when nothing runs."""
        while True:
            try:
                while (item := self._requests.get(block=not self._running)) is not None:
                    self._admit(*item)
            except queue.Empty:  # nothing more submitted: generate
                pass
            else:  # stop(): end what still runs
                for uid in list(self._running):
                    self._end(uid)
                return
            for uid, (_, handle, _) in list(self._running.items()):
                if handle.cancelled.is_set():
                    self._end(uid)
            if self._running:
                self._step()

    def _admit(self, request: GenerationRequest, handle: Handle) -> None:
        if handle.cancelled.is_set():
            return self._close(handle)
        try:
            uid = self._batch.insert(request.prompt, **request.generation_kwargs())
        except Exception as error:  # bad input (ValueError) is the client's to hear
            return self._close(handle, error)
        self._running[uid] = (request, handle, [])

    def _step(self) -> None:
        try:
            events = self._batch.step()
        except Exception as error:  # inside the model: every running request hears it
            for uid in list(self._running):
                self._end(uid, error)
            return
        for uid, response in events:
            request, handle, answer = self._running[uid]
            self.tokens_generated += 1
            handle.put(self._event(request, response, answer))
            if response.finish_reason:
                del self._running[uid]
                self._close(handle)

    def _end(self, uid: int, error: Exception | None = None) -> None:
        """Take a running request out of the batch (its slot free at once) and close it."""
        self._batch.cancel(uid)
        _, handle, _ = self._running.pop(uid)
        self._close(handle, error)

    def _close(self, handle: Handle, error: Exception | None = None) -> None:
        if error is not None:
            if not isinstance(error, ValueError):
                log.exception("request failed", exc_info=error)
            handle.put(error)
        with self._lock:
            self._accepted -= 1
        handle.close()

    def _event(
        self, request: GenerationRequest, response: GenerationResponse, answer: list[str]
    ) -> Event:
        """`response` as plain data; `answer` collects the answer's tokens' text so far."""
        usage = Usage(
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.generation_tokens,
            cached_tokens=response.cached_tokens,
        )
        event = Event(
            text=response.text,
            reasoning=response.reasoning,
            token=response.token,
            usage=usage,
            finish_reason=response.finish_reason,
        )
        answer_token = not response.reasoning and response.token not in self._special
        if answer_token:
            answer.append(self.token_text(response.token))
        if answer_token and request.top_logprobs is not None:
            event = self._with_logprobs(event, response.logprobs, request.top_logprobs)
        if response.finish_reason == "stop" and response.token not in self._special:
            event = replace(event, stop_sequence=_first_stop("".join(answer), request.stop))
        return event

    @cached_property
    def _special(self) -> frozenset[int]:
        """Tokens that are not answer text: the stop tokens and `</think>`."""
        think_close = self.tokenizer.encode(THINK_CLOSE)
        return (
            self.tokenizer.eos_token_ids
            | set(self.model.config.eos_token_ids)
            | set(think_close if len(think_close) == 1 else ())
        )

    def _with_logprobs(self, event: Event, logprobs: mx.array, n: int) -> Event:
        """The chosen token's log-probability and the `n` largest ones (logprobs: [vocab])."""
        chosen = TokenLogprob(self.token_text(event.token), logprobs[event.token].item())
        top = []
        if n > 0:
            ids = mx.argpartition(-logprobs, n - 1)[:n]  # [n], unordered
            values = logprobs[ids].tolist()
            top = [
                TokenLogprob(self.token_text(i), value)
                for value, i in sorted(zip(values, ids.tolist()), reverse=True)
            ]
        return replace(event, logprob=chosen, top_logprobs=top)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])


def _first_stop(text: str, stops: Sequence[str]) -> str | None:
    """The stop string that appears first in `text` (the one that ended it)."""
    found = [(text.find(stop), stop) for stop in stops if stop in text]
    return min(found)[1] if found else None
