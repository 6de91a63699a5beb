"""Generation as layered generators: `generate_step` -> `stream_generate` -> `generate`.

`generate_step` turns token ids into tokens (chunked prefill, then one token per step, with the
next step queued before the current token is read, as mlx-lm does). `stream_generate` adds the
tokenizer: the prompt (`prompt.py` builds it from text, ids or chat messages with images and
videos), streaming text, reasoning vs answer, stop tokens and strings, statistics. `generate`
collects a whole completion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .constrained import Grammar, response_format_grammar
from .models.state import PromptCache, Snapshot
from .prompt import Prompt, VisionCache, place, prepare_prompt
from .prompt_cache import PrefixCache
from .sampling import (
    Distribution,
    Penalties,
    check_seed,
    greedy,
    make_distribution,
    make_sampler,
)
from .speculative import Speculation, SpeculativeStats, make_speculation, speculative_decode
from .tokenizer import THINK_CLOSE, THINK_OPEN

LogitsProcessor = Callable[[list[int], mx.array], mx.array]


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context window."""


def generate_step(
    prompt: mx.array,
    model,
    *,
    cache: PromptCache | None = None,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 2048,
    input_embeddings: mx.array | None = None,
    position_ids: mx.array | None = None,
    rope_delta: int = 0,
    prompt_keys: Sequence[int] | None = None,
    snapshot_at: Sequence[int] = (),
    on_snapshot: Callable[[Snapshot], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    speculation: Speculation | None = None,
    distribution: Distribution | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yields (token, log-probabilities [vocab]) for up to `max_tokens` new tokens.

    Args:
        prompt: token ids [T], T >= 1, that follow what `cache` holds.
        model: a loaded model.
        cache: from `model.make_cache()`, updated in place and never left half-updated: a
            model call that raises (an error, KeyboardInterrupt) is rolled back. Its `tokens`
            hold what went through the model, the last sampled token included once it is fed.
        sampler: log-probabilities [1, vocab] -> token [1]; greedy when None.
        logits_processors: f(generated tokens, logits [1, vocab]) -> logits.
        prefill_step_size: prompt tokens per forward pass during prefill (bounds memory).
        input_embeddings: [1, T, H] the prompt's embeddings, vision features in place (instead
            of looking up `prompt`'s).
        position_ids: [3, 1, T] the prompt's M-RoPE positions, continuing the cache's.
        rope_delta: decode positions are cache length + rope_delta (the sum of the multimodal
            prompts' deltas in the cache, this one's included; 0 for text); kept on the cache.
        prompt_keys: the prompt tokens' prefix-cache keys (default: the ids).
        snapshot_at: prompt lengths (counted from the prompt's start) at which `on_snapshot`
            gets a snapshot of the cache; prefill steps end there.
        progress: called as progress(done, total) with prompt tokens processed: 0 first,
            after each prefill step, and total once the last prompt token is through.
        speculation: decode speculatively with its drafter (speculative.py): the same
            tokens as plain greedy decoding, or the same distribution when sampling.
        distribution: what `sampler` samples from (`sampling.make_distribution`); needed
            with `speculation` unless decoding greedily.
    """
    if prompt.size == 0:
        raise ValueError("the prompt is empty; give at least one token")
    check_whole("prefill_step_size", prefill_step_size, 1)
    check_whole("max_tokens", max_tokens, 0)
    if max_tokens == 0:
        return
    if input_embeddings is None:
        model.check_token_ids(prompt)
    if speculation is not None and sampler not in (None, greedy) and distribution is None:
        raise ValueError(
            "speculative sampling needs the distribution the sampler draws from: pass "
            "distribution= (sampling.make_distribution) with the sampler"
        )
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or greedy
    ids = prompt.tolist()
    keys = ids if prompt_keys is None else list(prompt_keys)
    stops = sorted({n for n in snapshot_at if 0 < n <= len(ids)})
    generated: list[int] = []
    # the ids were checked above and sampled ids are in range: the model need not read them
    decode = {"rope_delta": rope_delta, "check_ids": False}
    drafter = None if speculation is None else speculation.drafter
    if drafter is not None:  # the drafter reads the model's hidden states
        decode["return_hidden"] = True
        drafter.start(cache.offset, rope_delta)

    def feed(tokens: mx.array, fed_ids: list[int], fed_keys: list[int], inputs: dict):
        return feed_model(model, cache, tokens, fed_ids, fed_keys, inputs)

    def feed_prompt(start: int, end: int):
        inputs = prompt_inputs(decode, input_embeddings, position_ids, start, end)
        out = feed(prompt[start:end], ids[start:end], keys[start:end], inputs)
        if drafter is None:
            return out
        positions = None if position_ids is None else position_ids[..., start:end]
        drafter.feed(ids[start:end], out[1], positions)
        return out[0]

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        return sample_token(logits, generated, logits_processors, sampler)

    def step(
        tokens: mx.array, fed_ids: list[int], fed_keys: list[int], inputs: dict
    ) -> tuple[mx.array, mx.array]:
        return sample(feed(tokens, fed_ids, fed_keys, inputs)[:, -1, :])

    def snapshot_if_asked(prompt_length: int) -> None:
        if on_snapshot is not None and prompt_length in stops:
            on_snapshot(cache.snapshot())

    # Fill the cache with all but the last prompt token. Only the cache is evaluated, so the
    # lazy graph never computes these tokens' logits (the vocab-sized head is the costliest
    # matrix); the last token then goes through the model alone.
    report = progress or (lambda done, total: None)
    start = 0
    report(0, len(ids))
    while len(ids) - start > 1:
        end = prefill_end(start, len(ids), prefill_step_size, stops)
        feed_prompt(start, end)
        mx.eval(cache.state, [] if drafter is None else drafter.state)
        snapshot_if_asked(end)
        start = end
        report(start, len(ids))

    token, logprobs = sample(feed_prompt(start, len(ids))[:, -1, :])
    cache.rope_delta = rope_delta
    snapshot_if_asked(len(ids))
    mx.async_eval(token, logprobs)
    if progress is not None:  # the prompt is through once its last token's logits are
        mx.eval(token)
        progress(len(ids), len(ids))
    if speculation is not None:
        handover = yield from speculative_decode(
            model,
            cache,
            speculation,
            token=int(token.item()),
            logprobs=logprobs,
            max_tokens=max_tokens,
            distribution=distribution,
            logits_processors=logits_processors,
            generated=generated,
            feed=feed,
            decode_inputs=decode,
        )
        if handover is None:
            return
        token, logprobs, emitted = handover  # drafting does not pay here: plain decoding
        token, max_tokens = mx.array([token]), max_tokens - emitted
        del decode["return_hidden"]
    for n in range(max_tokens):
        generated.append(int(token.item()))
        if n + 1 < max_tokens:  # queue the next step before yielding this token
            last = generated[-1:]
            next_token, next_logprobs = step(token, last, last, decode)
            mx.async_eval(next_token, next_logprobs)
        yield generated[-1], logprobs
        if n + 1 < max_tokens:
            token, logprobs = next_token, next_logprobs


def feed_model(
    model, cache: PromptCache, tokens: mx.array, ids: list[int], keys: list[int], inputs: dict
):
    """The model's output for `tokens` [T] after what `cache` holds; the cache is rolled back
    if the call raises, else it records `ids` and their prefix-cache `keys`."""
    before = cache.snapshot()
    try:
        out = model(tokens[None], cache=cache, **inputs)
    except BaseException:
        cache.restore(before, owned=True)
        raise
    cache.append(ids, keys)
    return out


def prompt_inputs(
    decode: dict,
    input_embeddings: mx.array | None,
    position_ids: mx.array | None,
    start: int,
    end: int,
) -> dict:
    """The model's keyword arguments for prompt tokens start..end-1: `decode`'s, plus their
    embeddings and M-RoPE positions where the prompt has them."""
    inputs = dict(decode)
    if input_embeddings is not None:
        inputs["input_embeddings"] = input_embeddings[:, start:end]
    if position_ids is not None:
        inputs["position_ids"] = position_ids[..., start:end]
    return inputs


def prefill_end(start: int, total: int, step: int, stops: Sequence[int]) -> int:
    """Where the prefill chunk from `start` ends: `step` tokens on, at the next of `stops`
    (snapshot points), or one before the prompt's last token (which goes through alone)."""
    return min([start + step, total - 1, *(n for n in stops if n > start)])


def sample_token(
    logits: mx.array,
    generated: list[int],
    logits_processors: Sequence[LogitsProcessor],
    sampler: Callable[[mx.array], mx.array],
) -> tuple[mx.array, mx.array]:
    """Logits [1, vocab] -> (token [1], log-probabilities [vocab])."""
    for process in logits_processors:
        logits = process(generated, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs), logprobs.squeeze(0)


@dataclass
class GenerationResponse:
    """One streamed step. `text` is the new text; `reasoning` says if it is thinking text."""

    text: str
    token: int
    logprobs: mx.array
    reasoning: bool
    prompt_tokens: int
    prompt_tps: float  # over the prompt tokens that went through the model
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" | "length" | None while generating
    cached_tokens: int = 0  # prompt tokens restored from the prompt cache
    speculative: SpeculativeStats | None = None  # drafting so far, when decoding speculatively


@dataclass
class Completion:
    """What `generate` returns: the answer, the reasoning before it, and statistics."""

    text: str
    reasoning: str
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float
    cached_tokens: int = 0
    speculative: SpeculativeStats | None = None


def stream_generate(
    model,
    tokenizer,
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
    prefill_step_size: int = 2048,
    cache: PromptCache | None = None,
    prompt_cache: PrefixCache | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    vision_cache: VisionCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    mtp: bool = False,
    draft_model=None,
    num_draft_tokens: int = 3,
    adaptive_drafting: bool = True,
    response_format: Mapping | None = None,
    constraint: Grammar | None = None,
) -> Iterator[GenerationResponse]:
    """Stream a completion.

    Args:
        model, tokenizer: from `qwen35_mlx.load`.
        prompt: chat messages (OpenAI style, chat template applied), text (used as is) or
            token ids. Message content may be a list of items: {"type": "text", "text": ...},
            {"type": "image", "image": path, PIL image or bytes}, {"type": "image_url",
            "image_url": {"url": path or data: URL}}, {"type": "video", "video": path (a video
            file, a directory of frames or an animated GIF)}.
        images, videos: the simple form: put before the text of the (last) user message; a
            text prompt then becomes a user message and goes through the chat template.
        enable_thinking: think before answering; None follows the chat template's default
            (off for 0.8B/2B, on for 4B/9B). Only used when `prompt` is messages.
        tools: tool definitions (OpenAI form) the chat template shows the model; read its
            calls from the answer with `qwen35_mlx.tool_calls` (`parse_tool_calls`,
            `ToolCallStream`). Messages may carry earlier `tool_calls` and `role: "tool"`
            results.
        max_tokens: most tokens to generate.
        temp, top_p, top_k, min_p: sampling (temp 0 is greedy).
        repetition_penalty, presence_penalty, frequency_penalty: penalties over all the
            tokens generated so far (OpenAI semantics for presence/frequency).
        seed: seed MLX's random generator for reproducible sampling.
        stop: a string or strings that end the answer where they first appear (they are not
            part of the text); the reasoning is not searched. Text that could be the start of
            one is held back until it is known not to be.
        prefill_step_size: prompt tokens per forward pass.
        cache: a cache to continue from (`model.make_cache()`); the prompt is what follows it.
            It is updated in place and left consistent whatever happens: an error or
            KeyboardInterrupt inside the model rolls back the step it was in, and a consumer
            that stops reading leaves it holding the tokens fed so far.
        prompt_cache: a `PrefixCache` for callers that resend a whole history (as OpenAI-style
            clients do): generation starts from the longest cached prefix of the prompt and
            only the rest goes through the model; snapshots at message starts, every
            `prompt_cache.interval` tokens, at the prompt's end and after the reply are kept
            for the next call. Not with `cache`.
        kv_bits, kv_group_size, quantized_kv_start: keep the attention layers' keys and
            values quantized to 8 or 4 bits in groups of kv_group_size, once the cache holds
            quantized_kv_start tokens (mlx-lm's names); for the cache made here.
        vision_cache: a `VisionCache` that keeps encoded images and videos between calls.
        progress: progress(done, total) during prefill, as `generate_step` calls it.
        mtp: decode speculatively, drafting with the checkpoint's MTP head.
        draft_model: decode speculatively, drafting with this smaller model of the same
            tokenizer: a model, or the (model, tokenizer) pair `load` returns (the tokenizers
            are then compared). Speculation gives the tokens of plain greedy decoding, or the
            same distribution when sampling; `speculative` on the responses says how it went.
        num_draft_tokens: the most tokens drafted per round (1 to 16).
        adaptive_drafting: draft fewer tokens, or none, when the measured acceptance and costs
            say more do not pay; False drafts num_draft_tokens every round.
        response_format: OpenAI's: {"type": "json_object"} or {"type": "json_schema",
            "json_schema": {"name": ..., "schema": {...}}} constrain the answer to JSON (of
            that schema), ending when the value closes (docs/ARCHITECTURE.md §14; needs the
            `server` extra).
        constraint: a `constrained.Grammar` for the answer, e.g. `tool_call_grammar(tools,
            "required")`; not with response_format. Reasoning before it is free.

    Yields:
        GenerationResponse per token; the last one has `finish_reason` "stop" or "length".
    """
    sampler = make_sampler(temp, top_p=top_p, top_k=top_k, min_p=min_p)
    distribution = make_distribution(temp, top_p=top_p, top_k=top_k, min_p=min_p)
    penalties = Penalties(repetition_penalty, presence_penalty, frequency_penalty)
    check_seed(seed)
    check_whole("max_tokens", max_tokens, 0)
    stops = StopStrings(stop)
    grammar = answer_grammar(response_format, constraint, mtp or draft_model is not None)
    speculation = make_speculation(
        model,
        tokenizer,
        mtp=mtp,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        adaptive=adaptive_drafting,
    )
    if cache is not None and prompt_cache is not None:
        raise ValueError(
            "give cache= (a conversation to continue) or prompt_cache= (cached "
            "prefixes of whole histories), not both"
        )
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    start = time.perf_counter()  # prompt time includes the vision tower
    request = prepare_request(
        model,
        tokenizer,
        prompt,
        images=images,
        videos=videos,
        enable_thinking=enable_thinking,
        tools=tools,
        vision_cache=vision_cache,
        max_tokens=max_tokens,
        stops=stops,
        cache=cache,
        prompt_cache=prompt_cache,
        cache_kwargs={
            "kv_bits": kv_bits,
            "kv_group_size": kv_group_size,
            "quantized_kv_start": quantized_kv_start,
        },
        prefill_step_size=prefill_step_size,
    )
    processors = reply_processors(model, tokenizer, penalties, grammar, request.reply)
    steps = generate_step(
        mx.array(request.ids[request.reused :]),
        model,
        cache=request.cache,
        max_tokens=request.max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prefill_step_size=prefill_step_size,
        input_embeddings=request.input_embeddings,
        position_ids=request.position_ids,
        rope_delta=request.rope_delta,
        prompt_keys=request.keys[request.reused :],
        snapshot_at=request.snapshot_at,
        on_snapshot=None if prompt_cache is None else prompt_cache.insert,
        progress=progress,
        speculation=speculation,
        distribution=distribution,
    )
    try:
        prompt_tps = 0.0
        for n, (token, logprobs) in enumerate(steps, start=1):
            if n == 1:
                prompt_tps = request.fed / (time.perf_counter() - start)
                start = time.perf_counter()
            response = request.respond(
                token,
                logprobs,
                n,
                prompt_tps,
                time.perf_counter() - start,
                speculative=None if speculation is None else speculation.stats,
            )
            yield response
            if response.finish_reason:
                return
    finally:
        request.keep_reply()


@dataclass
class Request:
    """A prompt made ready to generate from (`prepare_request`): its ids, the cache it
    continues, the part of it still to feed and how, and the reply's text so far. Shared by
    `stream_generate` and `batch.BatchGenerator`."""

    ids: list[int]
    keys: list[int]  # the ids as prefix-cache keys
    cache: PromptCache
    reused: int  # prompt tokens restored from the prefix cache
    input_embeddings: mx.array | None  # [1, T - reused, H] of the tokens to feed
    position_ids: mx.array | None  # [3, 1, T - reused] M-RoPE positions of those
    rope_delta: int  # the M-RoPE shift decoding continues with
    max_tokens: int  # as asked, or what fits in the context window
    reply: ReplyText
    snapshot_at: list[int]  # prompt lengths after `reused` to snapshot at
    prompt_cache: PrefixCache | None

    @property
    def fed(self) -> int:
        """Prompt tokens that go through the model."""
        return len(self.ids) - self.reused

    def respond(
        self,
        token: int,
        logprobs: mx.array,
        n: int,
        prompt_tps: float,
        elapsed: float,
        speculative: SpeculativeStats | None = None,
    ) -> GenerationResponse:
        """The response for the n-th generated token, `elapsed` seconds after the first."""
        text, finish = self.reply.add(token, last=n == self.max_tokens)
        return GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            reasoning=self.reply.reasoning,
            prompt_tokens=len(self.ids),
            cached_tokens=self.reused,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            speculative=speculative,
        )

    def keep_reply(self) -> None:
        """Into the prefix cache: the cache after the prompt and the reply so far, where the
        next turn of the conversation starts."""
        if self.prompt_cache is not None and self.cache.offset >= len(self.ids):
            self.prompt_cache.insert(self.cache.snapshot())


def prepare_request(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int,
    stops: StopStrings,
    cache: PromptCache | None = None,
    prompt_cache: PrefixCache | None = None,
    cache_kwargs: dict | None = None,
    prefill_step_size: int = 2048,
    **prompt_options,
) -> Request:
    """The prompt through the processor and vision tower (`prepare_prompt` with
    `prompt_options`), the cache it continues (`cache`, a new one, or the longest prefix
    `prompt_cache` holds), checked to fit in the context window and in memory before any work
    (arguments as `stream_generate`'s)."""
    inputs = prepare_prompt(model, tokenizer, prompt, **prompt_options)
    ids, keys = inputs.ids, inputs.keys or inputs.ids
    cache_kwargs = cache_kwargs or {}
    if prompt_cache is None:
        cache = model.make_cache(**cache_kwargs) if cache is None else cache
        check_owner(cache, model)
        held, reused = cache.offset, 0  # the prompt follows what the cache holds
        positions, decode_rope_delta = place(inputs, cache.offset, cache.rope_delta)
        snapshot_at = []
    else:
        cache = prompt_cache.restore(model, keys, **cache_kwargs)  # the prompt starts there
        held, reused = 0, cache.offset
        positions, decode_rope_delta = place(inputs, 0, 0)
        snapshot_at = [n - reused for n in prompt_cache.snapshot_points(tokenizer, ids, reused)]
    max_tokens = min(max_tokens, room_left(model, held, len(ids), max_tokens))
    from .plan import check_fits  # here: the planner's tables cost start-up time

    check_fits(
        model,
        held + len(ids) + max_tokens,
        kv_bits=cache_kwargs.get("kv_bits") or 16,
        prefill_step_size=prefill_step_size,
    )  # refuse before any work, saying what fits
    return Request(
        ids=ids,
        keys=keys,
        cache=cache,
        reused=reused,
        input_embeddings=_tail(inputs.input_embeddings, reused),
        position_ids=None if positions is None else positions[..., reused:],
        rope_delta=decode_rope_delta,
        max_tokens=max_tokens,
        reply=ReplyText(tokenizer, model.config.eos_token_ids, ids, stops),
        snapshot_at=snapshot_at,
        prompt_cache=prompt_cache,
    )


def _tail(embeddings: mx.array | None, start: int) -> mx.array | None:
    return None if embeddings is None else embeddings[:, start:]


def generate(model, tokenizer, prompt: Prompt, *, verbose: bool = False, **kwargs) -> Completion:
    """Generate a whole completion; keyword arguments as `stream_generate`.

    Returns a Completion whose `text` is the answer and `reasoning` the thinking text
    (empty when the model did not think).
    """
    parts: dict[bool, list[str]] = {True: [], False: []}
    last = None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        parts[last.reasoning].append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if last is None:  # max_tokens=0
        return Completion("", "", "length", 0, 0, 0.0, 0.0, 0.0)
    if verbose:
        print(
            f"\nPrompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens/s\n"
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens/s\n"
            f"Peak memory: {last.peak_memory:.3f} GB"
        )
        if last.speculative is not None:
            print(f"Speculative: {last.speculative.summary()}")
    return Completion(
        text="".join(parts[False]),
        reasoning="".join(parts[True]).strip(),
        finish_reason=last.finish_reason or "length",
        prompt_tokens=last.prompt_tokens,
        generation_tokens=last.generation_tokens,
        prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps,
        peak_memory=last.peak_memory,
        cached_tokens=last.cached_tokens,
        speculative=last.speculative,
    )


def reply_processors(
    model, tokenizer, penalties: Penalties, grammar: Grammar | None, reply: ReplyText
) -> list[LogitsProcessor]:
    """The logits processors of one reply: the penalties when on, the grammar's mask when
    given (free while the reply reasons)."""
    processors = [penalties] if penalties.active else []
    if grammar is not None:
        vocab = model.config.text.vocab_size
        processors.append(grammar.processor(tokenizer, vocab, thinking=reply.reasoning))
    return processors


def answer_grammar(
    response_format: Mapping | None, constraint: Grammar | None, speculative: bool
) -> Grammar | None:
    """The grammar the answer follows, from stream_generate's arguments (None: free text)."""
    if response_format is not None and constraint is not None:
        raise ValueError("give response_format or constraint, not both")
    grammar = constraint or response_format_grammar(response_format)
    if grammar is not None and speculative:
        raise ValueError(
            "constrained decoding (response_format, constraint) does not combine with "
            "speculative decoding; leave out mtp and draft_model"
        )
    return grammar


def check_owner(cache: PromptCache, model) -> None:
    """ValueError for a cache made by another model (or another checkpoint or dtype)."""
    if not cache.fingerprint.startswith(model.fingerprint):
        raise ValueError(
            "this cache belongs to another model (or another checkpoint, config or "
            "dtype); continue it with the model that made it, or start a new one "
            "with model.make_cache()"
        )


def room_left(model, cached: int, prompt: int, max_tokens: int) -> int:
    """Tokens that fit after the prompt in the model's context window; ContextLengthError when
    the prompt does not fit, or fills the window when tokens are asked for."""
    context = model.config.text.max_position_embeddings
    room = context - cached - prompt
    if room < 0:
        raise ContextLengthError(
            f"the prompt has {prompt} tokens (plus {cached} already in the cache) but the "
            f"model's context window is {context}; shorten the prompt or start a new cache"
        )
    if room == 0 and max_tokens > 0:
        raise ContextLengthError(
            f"the prompt ({prompt} tokens, plus {cached} already in the cache) fills the "
            f"model's context window of {context} exactly, leaving no room for a reply; "
            "shorten the prompt or start a new cache"
        )
    return room


class ReplyText:
    """Generated tokens as text: streamed without splitting characters, reasoning told apart
    from the answer (up to `</think>`), ended by a stop token or one of `stops` (searched in the
    answer only)."""

    def __init__(self, tokenizer, model_stop_ids, prompt_ids: Sequence[int], stops: StopStrings):
        self.stop_ids = set(tokenizer.eos_token_ids) | set(model_stop_ids)
        think_end = tokenizer.encode(THINK_CLOSE)
        self.think_end = think_end[0] if len(think_end) == 1 else None
        self.reasoning = opens_thinking(tokenizer, prompt_ids)
        self.answer_started = not self.reasoning
        self.detokenizer = tokenizer.detokenizer()
        self.stops = stops

    def add(self, token: int, last: bool) -> tuple[str, str | None]:
        """(the new text, the finish reason: "stop", "length" when `last`, or None)."""
        finish = "stop" if token in self.stop_ids else ("length" if last else None)
        if token == self.think_end and self.reasoning:
            self.reasoning = False
        elif finish != "stop":
            self.detokenizer.add_token(token)
        if finish:
            self.detokenizer.finalize()
        text = self.detokenizer.last_segment
        if self.reasoning:
            return text, finish
        if not self.answer_started:  # drop the blank lines after </think>
            text = text.lstrip()
            self.answer_started = bool(text)
        text, stopped = self.stops.feed(text)
        if stopped:
            return text, "stop"
        return (text + self.stops.flush(), finish) if finish else (text, None)


class StopStrings:
    """Finds the first stop string in streamed text, holding back what may be the start of
    one."""

    def __init__(self, stop: str | Sequence[str] | None):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that can be shown, whether a stop string was reached: the text then ends
        just before it)."""
        self.pending += text
        found = [at for at in (self.pending.find(s) for s in self.stops) if at >= 0]
        if found:
            shown, self.pending = self.pending[: min(found)], ""
            return shown, True
        held = max(
            (n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])),
            default=0,
        )
        shown = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(shown) :]
        return shown, False

    def flush(self) -> str:
        held, self.pending = self.pending, ""
        return held


def opens_thinking(tokenizer, ids: Sequence[int]) -> bool:
    """Whether the prompt ends inside an open <think> block (the model starts by reasoning)."""
    tail = tokenizer.decode(list(ids[-8:]))
    return tail.rstrip().endswith(THINK_OPEN)


def check_whole(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
