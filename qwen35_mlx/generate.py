"""Generation as layered generators: `generate_step` -> `stream_generate` -> `generate`.

`generate_step` turns a prompt into tokens (chunked prefill, then one token per step, with the
next step queued before the current token is read, as mlx-lm does). `stream_generate` adds the
tokenizer: chat templating, images and videos (`media.py`), streaming text, reasoning vs answer,
stop tokens, statistics. `generate` collects a whole completion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .media import (PromptInputs, VisionCache, as_list, attach_media, encode_prompt,
                    media_sources)
from .sampling import Penalties

Prompt = str | Sequence[int] | Sequence[dict] | PromptInputs
LogitsProcessor = Callable[[list[int], mx.array], mx.array]
THINK_END = "</think>"


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context window."""


def generate_step(
    prompt: mx.array,
    model,
    *,
    cache: list | None = None,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 2048,
    input_embeddings: mx.array | None = None,
    position_ids: mx.array | None = None,
    rope_delta: int = 0,
) -> Iterator[tuple[int, mx.array]]:
    """Yields (token, log-probabilities [vocab]) for up to `max_tokens` new tokens.

    Args:
        prompt: token ids [T], T >= 1, not yet in `cache`.
        model: a loaded model; `cache` (from `model.make_cache()`) is updated in place.
        sampler: log-probabilities [1, vocab] -> token [1]; greedy when None.
        logits_processors: f(generated tokens, logits [1, vocab]) -> logits.
        prefill_step_size: prompt tokens per forward pass during prefill (bounds memory).
        input_embeddings: [1, T, H] the prompt's embeddings, vision features in place (instead
            of looking up `prompt`'s).
        position_ids: [3, 1, T] the prompt's M-RoPE positions, continuing the cache's.
        rope_delta: decode positions are cache length + rope_delta (the sum of the multimodal
            prompts' deltas in the cache; 0 for text).
    """
    if prompt.size == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if prefill_step_size < 1:
        raise ValueError("prefill_step_size must be at least 1")
    if max_tokens <= 0:
        return
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    generated: list[int] = []
    # vision keywords only when used: text generation calls the model as mlx-lm models are called
    shift = {"rope_delta": rope_delta} if rope_delta else {}

    def prompt_slice(start: int, end: int) -> dict:
        inputs = dict(shift)
        if input_embeddings is not None:
            inputs["input_embeddings"] = input_embeddings[:, start:end]
        if position_ids is not None:
            inputs["position_ids"] = position_ids[..., start:end]
        return inputs

    def step(tokens: mx.array, inputs: dict) -> tuple[mx.array, mx.array]:
        logits = model(tokens[None], cache=cache, **inputs)[:, -1, :]
        for process in logits_processors:
            logits = process(generated, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    # Fill the cache with all but the last prompt token. Only the cache is evaluated, so the
    # lazy graph never computes these tokens' logits (the vocab-sized head is the costliest
    # matrix); the last token then goes through the model alone.
    start = 0
    while prompt.size - start > 1:
        end = min(start + prefill_step_size, prompt.size - 1)
        model(prompt[start:end][None], cache=cache, **prompt_slice(start, end))
        mx.eval([c.state for c in cache])
        start = end

    token, logprobs = step(prompt[start:], prompt_slice(start, prompt.size))
    mx.async_eval(token, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:  # queue the next step before reading this token
            generated.append(int(token.item()))
            next_token, next_logprobs = step(token, shift)
            mx.async_eval(next_token, next_logprobs)
            yield generated[-1], logprobs
            token, logprobs = next_token, next_logprobs
        else:
            generated.append(int(token.item()))
            yield generated[-1], logprobs


@dataclass
class GenerationResponse:
    """One streamed step. `text` is the new text; `reasoning` says if it is thinking text."""

    text: str
    token: int
    logprobs: mx.array
    reasoning: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" | "length" | None while generating


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


def prompt_tokens(tokenizer, prompt: Prompt, enable_thinking: bool | None = None) -> list[int]:
    """A prompt as token ids: text is used as is, a list of messages goes through the chat
    template (with a generation prompt), and ids pass through."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if is_messages(prompt):
        return tokenizer.encode(chat_text(tokenizer, prompt, enable_thinking))
    return [int(t) for t in prompt]


def prepare_prompt(model, tokenizer, prompt: Prompt, *, images=None, videos=None,
                   enable_thinking: bool | None = None,
                   vision_cache: VisionCache | None = None) -> PromptInputs:
    """Any prompt as model inputs; the images and videos of messages (and of `images=`,
    `videos=`) go through the processor and the vision tower. See `stream_generate`."""
    images, videos = as_list(images), as_list(videos)
    if isinstance(prompt, PromptInputs):
        if images or videos:
            raise ValueError("the prompt is already prepared; put its images in it")
        return prompt
    if images or videos:
        prompt = attach_media(prompt, images, videos)
    if not is_messages(prompt):
        return PromptInputs(prompt_tokens(tokenizer, prompt))
    images, videos = media_sources(prompt)
    return encode_prompt(model, tokenizer, chat_text(tokenizer, prompt, enable_thinking),
                         images, videos, vision_cache=vision_cache)


def is_messages(prompt: Prompt) -> bool:
    return not isinstance(prompt, str) and bool(prompt) and isinstance(prompt[0], dict)


def chat_text(tokenizer, messages: Sequence[dict], enable_thinking: bool | None) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    images=None,
    videos=None,
    enable_thinking: bool | None = None,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    prefill_step_size: int = 2048,
    cache: list | None = None,
    rope_delta: int = 0,
    vision_cache: VisionCache | None = None,
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
        max_tokens: most tokens to generate.
        temp, top_p, top_k, min_p: sampling (temp 0 is greedy).
        repetition_penalty, presence_penalty, frequency_penalty: penalties over all the
            tokens generated so far (OpenAI semantics for presence/frequency).
        seed: seed MLX's random generator for reproducible sampling.
        prefill_step_size: prompt tokens per forward pass.
        cache: a cache to continue from (`model.make_cache()`); the prompt is what follows it.
        rope_delta: when `cache` holds images or videos, the sum of their prompts'
            `PromptInputs.rope_delta` (the M-RoPE position shift); `ChatSession` keeps it.
        vision_cache: a `VisionCache` that keeps encoded images and videos between calls.

    Yields:
        GenerationResponse per token; the last one has `finish_reason` "stop" or "length".
    """
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    start = time.perf_counter()  # prompt time includes the vision tower
    inputs = prepare_prompt(model, tokenizer, prompt, images=images, videos=videos,
                            enable_thinking=enable_thinking, vision_cache=vision_cache)
    ids = inputs.ids
    cache = model.make_cache() if cache is None else cache
    context = model.config.text.max_position_embeddings
    used = cache_offset(cache)
    if used + len(ids) > context:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens (plus {used} already in the cache) but the "
            f"model's context window is {context}; shorten the prompt or start a new cache")
    max_tokens = min(max_tokens, context - used - len(ids))

    stop_ids = set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids)
    think_end = tokenizer.encode(THINK_END)
    think_end = think_end[0] if len(think_end) == 1 else None
    reasoning = opens_thinking(tokenizer, ids)
    answer_started = not reasoning
    detokenizer = tokenizer.detokenizer()
    sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
    penalties = Penalties(repetition_penalty, presence_penalty, frequency_penalty)
    processors = [penalties] if penalties.active else []

    positions = inputs.position_ids
    steps = generate_step(mx.array(ids), model, cache=cache, max_tokens=max_tokens,
                          sampler=sampler, logits_processors=processors,
                          prefill_step_size=prefill_step_size,
                          input_embeddings=inputs.input_embeddings,
                          position_ids=None if positions is None else positions + used + rope_delta,
                          rope_delta=rope_delta + inputs.rope_delta)
    prompt_tps, n = 0.0, 0
    for n, (token, logprobs) in enumerate(steps, start=1):
        if n == 1:
            prompt_time = time.perf_counter() - start
            prompt_tps = len(ids) / prompt_time
            start = time.perf_counter()
        finish = "stop" if token in stop_ids else ("length" if n == max_tokens else None)
        if token == think_end and reasoning:
            reasoning = False
        elif finish != "stop":
            detokenizer.add_token(token)
        if finish:
            detokenizer.finalize()
        text = detokenizer.last_segment
        if not reasoning and not answer_started:  # drop the blank lines after </think>
            text = text.lstrip()
            answer_started = bool(text)
        elapsed = time.perf_counter() - start
        yield GenerationResponse(
            text=text, token=token, logprobs=logprobs, reasoning=reasoning,
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish)
        if finish:
            return


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
        print(f"\nPrompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens/s\n"
              f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens/s\n"
              f"Peak memory: {last.peak_memory:.3f} GB")
    return Completion(
        text="".join(parts[False]), reasoning="".join(parts[True]).strip(),
        finish_reason=last.finish_reason or "length", prompt_tokens=last.prompt_tokens,
        generation_tokens=last.generation_tokens, prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps, peak_memory=last.peak_memory)


def opens_thinking(tokenizer, ids: Sequence[int]) -> bool:
    """Whether the prompt ends inside an open <think> block (the model starts by reasoning)."""
    tail = tokenizer.decode(list(ids[-8:]))
    return tail.rstrip().endswith("<think>")


def cache_offset(cache: list) -> int:
    """Tokens already processed into `cache`."""
    return next((c.offset for c in cache if hasattr(c, "offset")), 0)
