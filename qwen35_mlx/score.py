"""Scoring text: the log-probability of each token given the ones before it, and perplexity.

`score` runs the text through the model in chunks of `prefill_step_size` tokens, carrying the
cache from chunk to chunk, so memory follows the chunk and not the text: each chunk's logits
[T, vocab] are reduced to the next tokens' log-probabilities (and the top-k alternatives) and
evaluated before the next chunk starts. Qwen3.5 has no BOS token, so the first token has nothing
before it and is context only: a text of N tokens scores N - 1 of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .prompt import prompt_tokens

Progress = Callable[[int, int], None]


@dataclass
class Score:
    """What `score` returns for a text of N tokens; position i scores tokens[i + 1]."""

    tokens: list[int] = field(repr=False)  # the N token ids of the text
    logprobs: mx.array  # [N - 1] float32: log p(tokens[i + 1] | tokens[: i + 1])
    nll: float  # negative log-likelihood of tokens[1:], summed, in nats
    top_tokens: mx.array | None = None  # [N - 1, k] the k likeliest next tokens, best first
    top_logprobs: mx.array | None = None  # [N - 1, k] their log-probabilities

    @property
    def num_scored(self) -> int:
        """Tokens scored: N - 1 (the first token is context only)."""
        return len(self.tokens) - 1

    @property
    def mean_nll(self) -> float:
        """Negative log-likelihood per scored token, in nats."""
        return self.nll / self.num_scored

    @property
    def perplexity(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.mean_nll)


def score(
    model,
    tokenizer,
    text_or_ids: str | Sequence[int] | mx.array,
    *,
    prefill_step_size: int = 512,
    max_tokens: int | None = None,
    top_k: int = 0,
    progress: Progress | None = None,
) -> Score:
    """Log-probability of each token of a text given the tokens before it.

    Args:
        model, tokenizer: from `qwen35_mlx.load`; `tokenizer` may be None when ids are given.
        text_or_ids: text (tokenized as is: no chat template, no special tokens added) or
            token ids [N], N >= 2.
        prefill_step_size: tokens per forward pass. Memory grows with it (one chunk's logits,
            [prefill_step_size, vocab] in float32, about 0.5 GB at 512 for the 248k vocab) and
            not with the text.
        max_tokens: score only the first `max_tokens` tokens (None: all).
        top_k: also keep the k likeliest next tokens at each position (0: none).
        progress: called as progress(done, total) with the tokens scored so far, once before
            the first chunk and after each chunk.

    Returns:
        A `Score`: per-token log-probabilities, total NLL, `num_scored`, `mean_nll`,
        `perplexity`, and the top-k alternatives when asked.

    Raises:
        ValueError: fewer than 2 tokens, a token id outside the vocabulary, or a text longer
            than the model's context window (pass `max_tokens` or split the text).
    """
    config = model.config.text
    check_options(prefill_step_size, max_tokens, top_k, config.vocab_size)
    ids = token_ids(tokenizer, text_or_ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    check_length(ids, config.max_position_embeddings)
    model.check_token_ids(ids)

    inputs, targets = mx.array(ids[:-1]), mx.array(ids[1:])  # [N - 1] each
    total = targets.size
    cache = model.make_cache()
    chunks: list[tuple[mx.array, ...]] = []
    nll = 0.0
    if progress:
        progress(0, total)
    for start in range(0, total, prefill_step_size):
        end = min(start + prefill_step_size, total)
        logits = model(inputs[None, start:end], cache=cache)[0]  # [T, vocab]
        chunk = next_token_logprobs(logits, targets[start:end], top_k)
        chunk_nll = -chunk[0].sum()
        mx.eval(chunk, chunk_nll, cache.state)  # frees this chunk's logits
        nll += chunk_nll.item()  # summed in Python floats: no float32 drift over long texts
        chunks.append(chunk)
        if progress:
            progress(end, total)

    logprobs, *top = (mx.concatenate(parts) for parts in zip(*chunks))
    return Score(ids, logprobs, nll, *top)


def next_token_logprobs(logits: mx.array, targets: mx.array, top_k: int) -> tuple[mx.array, ...]:
    """(log-probabilities of `targets` [T], and when top_k > 0 the top tokens [T, k] and their
    log-probabilities [T, k], best first) from `logits` [T, vocab].

    Only the gathered logits are normalised, so no [T, vocab] log-softmax is built beside the
    float32 logits."""
    logits = logits.astype(mx.float32)
    normalizer = mx.logsumexp(logits, axis=-1, keepdims=True)  # [T, 1]
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1) - normalizer  # [T, 1]
    if top_k == 0:
        return (picked.squeeze(-1),)
    top = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[:, :top_k]  # [T, k], any order
    top_logprobs = mx.take_along_axis(logits, top, axis=-1) - normalizer
    order = mx.argsort(-top_logprobs, axis=-1)
    return (
        picked.squeeze(-1),
        mx.take_along_axis(top, order, axis=-1),
        mx.take_along_axis(top_logprobs, order, axis=-1),
    )


def token_ids(tokenizer, text_or_ids) -> list[int]:
    """The text's ids (encoded as is), or the given ids as Python ints."""
    if isinstance(text_or_ids, str) and tokenizer is None:
        raise ValueError("scoring text needs the tokenizer; pass it, or pass token ids")
    return prompt_tokens(tokenizer, text_or_ids)


def check_options(
    prefill_step_size: int, max_tokens: int | None, top_k: int, vocab_size: int
) -> None:
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be at least 1, got {prefill_step_size}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(
            f"max_tokens must be at least 2 (the first token is context only), got {max_tokens}"
        )
    if not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [0, {vocab_size}] (the vocabulary size), got {top_k}")


def check_length(ids: list[int], context: int) -> None:
    if len(ids) < 2:
        raise ValueError(
            f"the text has {len(ids)} token(s); scoring needs at least 2 (the first "
            "is context only, Qwen3.5 has no BOS token)"
        )
    if len(ids) > context:
        raise ValueError(
            f"the text has {len(ids)} tokens but the model's context window is "
            f"{context}; score its first {context} (max_tokens={context}, "
            "--max-tokens) or split it"
        )
