"""Continuous batching: the decode steps of many requests in one model call, requests joining
and leaving between steps (docs/ARCHITECTURE.md §10.1).

Each request keeps its own `PromptCache`, prepared as `stream_generate` prepares it (prompt,
prefix-cache restore, context checks) and prefilled alone, chunk by chunk as `generate_step`
chunks it, a bounded amount per step so that decoding rows are not starved. Once its prompt
is through it joins the decode batch: the DeltaNet states of the batch's rows are stacked
[B, ...] while the batch stays the same, and each attention layer keeps the rows' own KV caches
(`RowKVCaches`), so rows sit at their own offsets and M-RoPE shifts with no padding. A row
leaving hands its state back to its own cache, whose snapshot goes into the prefix cache as
`stream_generate` would leave it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .constrained import Grammar
from .generate import (
    GenerationResponse,
    LogitsProcessor,
    Request,
    StopStrings,
    answer_grammar,
    check_whole,
    feed_model,
    prefill_end,
    prepare_request,
    prompt_inputs,
    reply_processors,
    sample_token,
)
from .models.cache import DeltaNetCache, RowKVCaches
from .prompt import Prompt, VisionCache
from .prompt_cache import PrefixCache
from .sampling import KeySequence, Penalties, Sampler, make_sampler


@dataclass(eq=False)
class Row:
    """One request in the generator: its prepared prompt and cache, how it samples, and where
    it is (prompt tokens fed; the sampled token not yet read back)."""

    uid: int
    request: Request
    sampler: Sampler
    processors: list[LogitsProcessor]
    fed: int = 0  # prompt tokens after the reused prefix that went through the model
    token: mx.array | None = None  # [1] sampled, not yet fed
    logprobs: mx.array | None = None  # [vocab] of `token`
    generated: list[int] = field(default_factory=list)
    started: float = 0.0  # when its prompt began to go through the model
    first_token: float = 0.0  # when its first token was read
    prompt_tps: float = 0.0

    def __post_init__(self):
        reused = self.request.reused
        self.ids = self.request.ids[reused:]  # the prompt ids to feed
        self.keys = self.request.keys[reused:]  # and their prefix-cache keys
        self.prompt = mx.array(self.ids)


class BatchGenerator:
    """Serves many requests at once: `insert` them, call `step` until they finish.

    Each request gets the tokens `stream_generate` gives it alone with the same arguments
    (greedy, or sampled with its own `seed`), and the same responses.

    Args:
        model, tokenizer: from `qwen35_mlx.load`.
        prompt_cache: a `PrefixCache` shared by the requests (and with `stream_generate`):
            each starts from the longest cached prefix of its prompt, looked up when it is
            inserted, and leaves snapshots at the points `stream_generate` does.
        max_batch: most requests generating at once; later ones wait their turn.
        prefill_step_size: prompt tokens per forward pass, and about the most prompt tokens
            each `step` puts through before its decode step.
        vision_cache: a `VisionCache` for the requests' images and videos.

    Not thread-safe: call it from one thread (the model's arrays are built there).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        prompt_cache: PrefixCache | None = None,
        max_batch: int = 8,
        prefill_step_size: int = 2048,
        vision_cache: VisionCache | None = None,
    ):
        check_whole("max_batch", max_batch, 1)
        check_whole("prefill_step_size", prefill_step_size, 1)
        self.model, self.tokenizer = model, tokenizer
        self.prompt_cache, self.vision_cache = prompt_cache, vision_cache
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self._next_uid = 0
        self._waiting: deque[Row] = deque()  # inserted, not yet admitted
        self._prefilling: list[Row] = []  # admitted, prompt going through
        self._decoding: list[Row] = []  # prompt through, generating
        self._stacked: list[Row] = []  # the rows `_layers` holds, in order
        self._layers: list = []  # per layer: stacked DeltaNetCache or RowKVCaches

    def __len__(self) -> int:
        """Requests not finished, waiting ones included."""
        return len(self._waiting) + len(self.active)

    @property
    def active(self) -> list[int]:
        """The uids of the requests in the batch (prompt going through or generating)."""
        return [row.uid for row in (*self._prefilling, *self._decoding)]

    def insert(
        self,
        prompt: Prompt,
        *,
        images=None,
        videos=None,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping] | None = None,
        max_tokens: int = 256,
        temp: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        response_format: Mapping | None = None,
        constraint: Grammar | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> int:
        """Queue a request; returns its uid. Arguments as `stream_generate`'s, plus
        `logits_processors` (f(generated ids, logits [1, vocab]) -> logits, this request's
        own). The prompt is prepared here (processor, vision tower, prefix-cache lookup,
        context checks), so bad input raises here, before any step."""
        check_whole("max_tokens", max_tokens, 1)  # a request always ends with a response
        keys = None if seed is None else KeySequence(seed)
        sampler = make_sampler(temp, top_p=top_p, top_k=top_k, min_p=min_p, keys=keys)
        penalties = Penalties(repetition_penalty, presence_penalty, frequency_penalty)
        grammar = answer_grammar(response_format, constraint, speculative=False)
        request = prepare_request(
            self.model,
            self.tokenizer,
            prompt,
            images=images,
            videos=videos,
            enable_thinking=enable_thinking,
            tools=tools,
            vision_cache=self.vision_cache,
            max_tokens=max_tokens,
            stops=StopStrings(stop),
            prompt_cache=self.prompt_cache,
            prefill_step_size=self.prefill_step_size,
        )
        processors = reply_processors(self.model, self.tokenizer, penalties, grammar, request.reply)
        row = Row(self._next_uid, request, sampler, [*processors, *logits_processors])
        mx.eval(row.prompt, request.input_embeddings, request.position_ids, keys and keys.key)
        self._next_uid += 1
        self._waiting.append(row)
        return row.uid

    def cancel(self, uid: int) -> None:
        """Drop a request at once, its slot free for the next step; its cache, as far as it
        got, goes into the prefix cache as when a `stream_generate` consumer stops reading."""
        for rows in (self._waiting, self._prefilling, self._decoding):
            for row in rows:
                if row.uid == uid:
                    self._leave(row)
                    return
        raise KeyError(f"no request {uid} in the generator (finished or never inserted)")

    def step(self) -> list[tuple[int, GenerationResponse]]:
        """Admit waiting requests into free slots, put up to about `prefill_step_size` prompt
        tokens through, then one decode step over every generating request. Returns
        (uid, response) for each token read, in the batch's order; a response with a
        `finish_reason` is its request's last."""
        while self._waiting and len(self.active) < self.max_batch:
            self._prefilling.append(self._waiting.popleft())
        budget = self.prefill_step_size
        while self._prefilling and budget > 0:
            row = self._prefilling[0]
            budget -= self._prefill(row)
            if row.token is not None:  # the prompt is through: generate
                self._decoding.append(self._prefilling.pop(0))
        return self._decode()

    def _prefill(self, row: Row) -> int:
        """One prompt chunk of `row` through the model, chunked and snapshotted as
        `generate_step` does; the last prompt token alone, sampling the first token. Returns
        the tokens fed."""
        request, cache, start = row.request, row.request.cache, row.fed
        if start == 0:
            row.started = time.perf_counter()
        total = request.fed
        end = prefill_end(start, total, self.prefill_step_size, request.snapshot_at)
        end = total if total - start == 1 else end
        decode = {"rope_delta": request.rope_delta, "check_ids": False}
        inputs = prompt_inputs(decode, request.input_embeddings, request.position_ids, start, end)
        tokens, ids, keys = row.prompt[start:end], row.ids[start:end], row.keys[start:end]
        logits = feed_model(self.model, cache, tokens, ids, keys, inputs)
        row.fed = end
        if end == total:
            row.token, row.logprobs = sample_token(
                logits[:, -1, :], row.generated, row.processors, row.sampler
            )
            cache.rope_delta = request.rope_delta
            mx.async_eval(row.token, row.logprobs)
        else:  # only the cache: the head never runs on these tokens
            mx.eval(cache.state)
        if end in request.snapshot_at:
            request.prompt_cache.insert(cache.snapshot())
        return end - start

    def _decode(self) -> list[tuple[int, GenerationResponse]]:
        """Read each generating row's token, feed those that go on in one model call, sample
        their next tokens, and answer with the tokens read."""
        rows = list(self._decoding)
        read = []
        for row in rows:
            row.generated.append(int(row.token.item()))
            read.append(row.logprobs)
            if len(row.generated) == 1:
                row.first_token = time.perf_counter()
                row.prompt_tps = row.request.fed / (row.first_token - row.started)
        going_on = [row for row in rows if len(row.generated) < row.request.max_tokens]
        try:
            if going_on:  # queued before the text work below, as generate_step does
                self._step_batch(going_on)
        except BaseException:  # the step is undone: the next one reads the same tokens
            for row in rows:
                row.generated.pop()
            raise
        events = []
        for row, logprobs in zip(rows, read):
            n = len(row.generated)
            elapsed = time.perf_counter() - row.first_token
            response = row.request.respond(row.generated[-1], logprobs, n, row.prompt_tps, elapsed)
            events.append((row.uid, response))
            if response.finish_reason:
                self._leave(row)
        return events

    def _step_batch(self, rows: list[Row]) -> None:
        """One model call over `rows`' last tokens [B, 1]; each samples its next token."""
        self._stack(rows)
        tokens = mx.concatenate([row.token for row in rows])[:, None]  # [B, 1]
        before = [layer.snapshot() for layer in self._layers]
        try:
            logits = self.model(tokens, cache=self._layers, check_ids=False)  # [B, 1, vocab]
        except BaseException:  # leave every row as it was before the call
            for layer, state in zip(self._layers, before, strict=True):
                layer.restore(state, owned=True)
            raise
        sampled = []
        for i, row in enumerate(rows):
            row.request.cache.append(row.generated[-1:])
            row.token, row.logprobs = sample_token(
                logits[i : i + 1, -1, :], row.generated, row.processors, row.sampler
            )
            sampled += [row.token, row.logprobs]
        mx.async_eval(sampled)

    def _stack(self, rows: list[Row]) -> None:
        """Make `_layers` the batch cache of `rows`, in order: their DeltaNet states stacked
        (held there, not in the rows' own caches, until `_unstack`), their KV caches as
        they are. Only when the rows differ from the last step's."""
        if [row.uid for row in rows] == [row.uid for row in self._stacked]:
            return
        self._unstack()
        own = [row.request.cache for row in rows]
        for index, layer in enumerate(own[0].layers):
            if isinstance(layer, DeltaNetCache):
                stacked = DeltaNetCache()
                for part in (0, 1):  # conv [B, K-1, C], recurrent [B, Hv, Dv, Dk]
                    stacked[part] = mx.concatenate([cache[index][part] for cache in own])
                for cache in own:
                    cache[index].arrays = [None, None]
            else:
                stacked = RowKVCaches(
                    [cache[index] for cache in own], [cache.rope_delta for cache in own]
                )
            self._layers.append(stacked)
        self._stacked = list(rows)

    def _unstack(self) -> None:
        """Each stacked row's DeltaNet states back into its own cache (copies: a view would
        keep the whole batch's state alive in the prefix cache)."""
        for i, row in enumerate(self._stacked):
            at = mx.array([i])
            for layer, own in zip(self._layers, row.request.cache.layers, strict=True):
                if isinstance(own, DeltaNetCache):
                    own.arrays = [mx.take(array, at, axis=0) for array in layer.arrays]
        self._layers, self._stacked = [], []

    def _leave(self, row: Row) -> None:
        """Free `row`'s slot; its cache goes into the prefix cache (`Request.keep_reply`)."""
        if row in self._stacked:
            self._unstack()
        for rows in (self._waiting, self._prefilling, self._decoding):
            if row in rows:
                rows.remove(row)
        row.request.keep_reply()
