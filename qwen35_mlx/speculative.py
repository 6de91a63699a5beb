"""Speculative decoding: a drafter proposes k tokens, the model checks them all in one forward
pass, and the longest agreeing prefix plus the model's own next token are kept
(docs/ARCHITECTURE.md §12).

Drafters: `MTPDrafter` (the checkpoint's own multi-token-prediction head, fed the model's
final-normed hidden states) and `ModelDrafter` (a smaller model with the same tokenizer). Any
object with `start`, `feed`, `draft` and `state` works (the tests use drafters that are always
right or always wrong).

Greedy decoding keeps a drafted token when it is the model's argmax, so the output is the plain
greedy output. Sampling uses speculative sampling (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding", Algorithm 1): drafted token d with draft probability q
and model probability p is kept with probability min(1, p/q); the first rejected position is
resampled from max(0, p - q), normalised; the output then has the plain sampler's distribution.

After a round the model's cache holds exactly the accepted tokens. A KV cache could be trimmed by
offset, but a DeltaNet state cannot: the cache is restored to its snapshot from before the
verify pass and the accepted tokens are fed again (only when some were rejected).

How many tokens to draft (`DraftPolicy`): the acceptance rate at each draft position and the
measured seconds of a round at each k give the expected tokens per second of each k; the best k
is used, down to 0 (plain decoding, with a probe now and then) when drafting does not pay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

MAX_DRAFT_TOKENS = 16
ROLLBACKS = ("steps", "refeed")

LogitsProcessor = Callable[[list[int], mx.array], mx.array]


def check_num_draft_tokens(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(
            f"num_draft_tokens must be a whole number from 1 to {MAX_DRAFT_TOKENS}, got {k!r}"
        )


@dataclass
class SpeculativeStats:
    """Drafting so far in one generation, per draft position too (index 0: a round's first
    drafted token)."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # verify passes
    plain_steps: int = 0  # rounds decoded without drafting (k = 0)
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # k of the last round
    expected_speedup: float | None = None  # the policy's estimate at that k vs plain decoding
    stopped_after: int | None = None  # tokens emitted when the costs ruled drafting out

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            self.plain_steps += 1
            return
        missing = drafted - len(self.drafted_at)
        if missing > 0:
            self.drafted_at.extend([0] * missing)
            self.accepted_at.extend([0] * missing)
        for i in range(drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < accepted
        self.drafted += drafted
        self.accepted += accepted
        self.rounds += 1

    def summary(self) -> str:
        by_position = " ".join(
            f"{kept / drafted:.2f}"
            for kept, drafted in zip(self.accepted_at, self.drafted_at, strict=True)
        )
        speedup = "-" if self.expected_speedup is None else f"{self.expected_speedup:.2f}x"
        summary = (
            f"drafted {self.drafted}, accepted {self.accepted} ({self.acceptance:.0%}; by "
            f"position {by_position or '-'}); {self.rounds} verify passes, {self.plain_steps} "
            f"plain steps"
        )
        if self.stopped_after is not None:
            return (
                f"{summary}; drafting stopped after {self.stopped_after} tokens: the measured "
                "costs say it cannot pay on this machine"
            )
        return f"{summary}; k now {self.num_draft_tokens}, expected speed-up {speedup}"


class DraftPolicy:
    """Chooses k each round from the acceptance per draft position and measured round times.

    The rate at position i is how often the i-th draft is kept when all before it were (a
    Beta(1, 1) prior; old rounds fade by FORGET per round). A round of k drafts is expected to
    emit 1 + sum over i <= k of the product of the rates up to i tokens. Round seconds are
    averaged per k as measured, and interpolated (or extrapolated) linearly for an untried k.
    The first round is plain (the baseline), the second drafts one token; from then on, the k
    with the most expected tokens per second, 0 included. While plain decoding wins, k = 1 is
    probed again after PROBE_EVERY plain rounds, then twice as many, and so on. When the costs
    alone rule drafting out (every round slower than plain decoding of all it could emit),
    `ruled_out` says so and generation goes on without drafting.
    """

    FORGET = 0.97
    PROBE_EVERY = 16

    def __init__(self, max_k: int, adaptive: bool = True):
        check_num_draft_tokens(max_k)
        self.max_k, self.adaptive = max_k, adaptive
        self.kept = [0.0] * max_k
        self.tried = [0.0] * max_k
        self.seconds: dict[int, float] = {}  # mean seconds of a round, per k
        self.plain_rounds = 0  # since drafting was last tried
        self.probe_every = self.PROBE_EVERY

    def acceptance(self) -> list[float]:
        return [(kept + 1) / (tried + 2) for kept, tried in zip(self.kept, self.tried)]

    def expected_tokens(self, k: int) -> float:
        tokens = reach = 1.0
        for rate in self.acceptance()[:k]:
            reach *= rate
            tokens += reach
        return tokens

    def round_seconds(self, k: int) -> float | None:
        if k in self.seconds:
            return self.seconds[k]
        tried = sorted(self.seconds)
        if len(tried) < 2:
            return None
        below, above = [t for t in tried if t < k], [t for t in tried if t > k]
        low, high = (below[-1], above[0]) if below and above else (tried[-2], tried[-1])
        slope = (self.seconds[high] - self.seconds[low]) / (high - low)
        return max(self.seconds[low] + slope * (k - low), 0.0)

    def speedup(self, k: int) -> float | None:
        """Expected tokens per second at k over plain decoding's."""
        plain, drafting = self.round_seconds(0), self.round_seconds(k)
        if plain is None or not drafting:
            return None
        return self.expected_tokens(k) * plain / drafting

    def choose(self, room: int) -> int:
        """k for the next round, when at most `room` more tokens may be emitted."""
        ceiling = min(self.max_k, room - 1)
        if ceiling <= 0:
            return 0
        if not self.adaptive:
            return ceiling
        for first in (0, 1):  # the baseline, then the cheapest drafting round
            if first not in self.seconds:
                return first
        best = max(range(ceiling + 1), key=lambda k: self.speedup(k) or 0.0)
        if best > 0:
            self.plain_rounds, self.probe_every = 0, self.PROBE_EVERY
            return best
        self.plain_rounds += 1
        if self.plain_rounds < self.probe_every:
            return 0
        self.plain_rounds, self.probe_every = 0, 2 * self.probe_every
        return 1

    def ruled_out(self) -> bool:
        """Whether drafting cannot pay here whatever the acceptance (adaptive only)."""
        if not self.adaptive or 0 not in self.seconds or 1 not in self.seconds:
            return False
        return not any(self.could_pay(k) for k in range(1, self.max_k + 1))

    def could_pay(self, k: int) -> bool:
        """Whether a round of k drafts beats plain decoding if every draft is kept."""
        return (k + 1) * self.round_seconds(0) > self.round_seconds(k)

    def update(self, k: int, accepted: int, seconds: float) -> None:
        if k:
            self.kept = [kept * self.FORGET for kept in self.kept]
            self.tried = [tried * self.FORGET for tried in self.tried]
            for i in range(min(accepted + 1, k)):  # the positions up to the first rejection
                self.tried[i] += 1
                self.kept[i] += i < accepted
        known = self.seconds.get(k)
        self.seconds[k] = seconds if known is None else 0.8 * known + 0.2 * seconds


def accept_greedy(drafts: Sequence[int], target_logprobs: mx.array) -> tuple[int, int]:
    """(drafts kept, the model's token after them) when decoding greedily. target_logprobs
    [k+1, vocab]: row i scores the token after drafts[:i]."""
    targets = mx.argmax(target_logprobs, axis=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted, targets[accepted]


def accept_sampled(
    drafts: Sequence[int], draft_logprobs: mx.array, target_logprobs: mx.array
) -> tuple[int, int]:
    """(drafts kept, the next token) by speculative sampling. draft_logprobs [k, vocab]: what
    the drafts were sampled from; target_logprobs [k+1, vocab]: the model's distributions (both
    as the sampler filters and tempers them)."""
    k = len(drafts)
    rows, chosen = mx.arange(k), mx.array(drafts)
    p = mx.exp(target_logprobs[rows, chosen])
    q = mx.exp(draft_logprobs[rows, chosen])
    kept = (mx.random.uniform(shape=(k,)) * q < p).tolist()  # u < p / q, without dividing
    accepted = next((i for i, keep in enumerate(kept) if not keep), k)
    if accepted == k:
        return k, int(mx.random.categorical(target_logprobs[k]).item())
    p_row, q_row = mx.exp(target_logprobs[accepted]), mx.exp(draft_logprobs[accepted])
    residual = mx.maximum(p_row - q_row, 0.0)  # > 0 somewhere, since q rejected here
    return accepted, int(mx.random.categorical(mx.log(residual)).item())


def pick(logprobs: mx.array, distribution: Callable | None, sampled_from: list) -> mx.array:
    """A drafted token (lazy) from log-probabilities [vocab]: the argmax when greedy, else
    sampled from `distribution(logprobs)`, which is kept in `sampled_from`."""
    if distribution is None:
        return mx.argmax(logprobs)
    dist = distribution(logprobs)
    sampled_from.append(dist)
    return mx.random.categorical(dist)


def draft_chain(logits: mx.array, next_logits: Callable, k: int, distribution: Callable | None):
    """k drafts picked one after another: from `logits` [vocab], then from
    `next_logits(step, draft)` after each but the last. Returns (the drafts, a lazy [k] array;
    the distributions they were sampled from, [k, vocab], or None when greedy)."""
    drafts, sampled_from = [], []
    for step in range(k):
        drafts.append(pick(logits - mx.logsumexp(logits), distribution, sampled_from))
        if step + 1 < k:
            logits = next_logits(step, drafts[-1])
    return mx.stack(drafts), (mx.stack(sampled_from) if sampled_from else None)


class MTPDrafter:
    """Drafts with the checkpoint's MTP head (docs/ARCHITECTURE.md §6): step 1 reads the
    model's hidden state at its last fed token and the embedding of the token after it; each
    next step reads the head's own output and the token it drafted.

    The head keeps a KV cache of the (hidden at t, token t+1) pairs of the real history, at
    position t. `feed` queues pairs; `draft` runs them through the head together with its first
    step, then trims the draft steps' entries away.
    """

    def __init__(self, model):
        if getattr(model, "mtp", None) is None:
            raise ValueError(
                "this checkpoint has no MTP head (no mtp.* tensors): speculate with a draft "
                "model instead (draft_model=, --draft-model), or load a checkpoint that kept "
                "its MTP head (every released Qwen3.5 checkpoint has one; mlx-lm's "
                "conversions drop it)"
            )
        self.model = model
        self.cache = model.mtp.make_cache()
        self.queued: list[tuple[mx.array, list[int], mx.array]] = []  # hidden, ids, positions
        self.last: tuple[mx.array, mx.array] | None = None  # hidden, position of the last token
        self.index = 0  # the model position index of the next token fed
        self.rope_delta = 0

    def start(self, offset: int, rope_delta: int) -> None:
        """The model's cache holds `offset` tokens the head will not see (a restored prefix);
        text positions are index + rope_delta."""
        self.index, self.rope_delta = offset, rope_delta

    def feed(self, ids: list[int], hidden: mx.array, position_ids: mx.array | None = None):
        """Tokens the model consumed, its hidden states at them [1, T, H], and their positions
        [3, 1, T] where they are not index + rope_delta (a prompt with images)."""
        if position_ids is None:
            position_ids = self._text_positions(self.index, len(ids))
        if self.last is None:  # the first token has no hidden state before it
            pairs = (hidden[:, :-1], ids[1:], position_ids[..., :-1])
        else:
            last_hidden, last_position = self.last
            pairs = (
                mx.concatenate([last_hidden, hidden[:, :-1]], axis=1),
                ids,
                mx.concatenate([last_position, position_ids[..., :-1]], axis=-1),
            )
        if pairs[1]:
            self.queued.append(pairs)
        self.last = (hidden[:, -1:], position_ids[..., -1:])
        self.index += len(ids)

    @property
    def state(self) -> list:
        """Runs the queued pairs through the head; the arrays to evaluate."""
        if self.queued:
            self._run(*self._take_queued())
        return [layer.state for layer in self.cache]

    def draft(self, token: int, k: int, distribution: Callable | None):
        """k drafts (a lazy [k] array) to follow the fed tokens and `token`, and what they
        were sampled from ([k, vocab] log-probabilities; None when greedy)."""
        last_hidden, last_position = self.last
        hidden, ids, positions = self._take_queued()
        keep = self.cache[0].offset + len(ids)  # the real pairs stay, the draft steps go
        hidden = last_hidden if hidden is None else mx.concatenate([hidden, last_hidden], 1)
        positions = (
            last_position if positions is None else mx.concatenate([positions, last_position], -1)
        )
        out = self._run(hidden, mx.array([*ids, token]), positions)[:, -1:]  # [1, 1, H]

        def next_logits(step: int, draft: mx.array) -> mx.array:
            nonlocal out  # the head reads its own output and its last draft
            out = self._run(out, draft.reshape(1), last_position + step + 1)
            return self.model.language_model.head(out)[0, -1]

        drafted = draft_chain(
            self.model.language_model.head(out)[0, -1], next_logits, k, distribution
        )
        for layer in self.cache:
            layer.offset = keep
        return drafted

    def _text_positions(self, start: int, count: int) -> mx.array:
        first = start + self.rope_delta
        return mx.broadcast_to(mx.arange(first, first + count, dtype=mx.int32), (3, 1, count))

    def _take_queued(self):
        if not self.queued:
            return None, [], None
        hidden, ids, positions = zip(*self.queued, strict=True)
        self.queued = []
        return (
            mx.concatenate(hidden, axis=1),
            [i for chunk in ids for i in chunk],
            mx.concatenate(positions, axis=-1),
        )

    def _run(self, hidden: mx.array, ids, positions: mx.array) -> mx.array:
        """The head over pairs (hidden [1, T, H], ids [T]) at positions [3, 1, T], appended to
        its cache -> [1, T, H]."""
        embeddings = self.model.language_model.model.embed_tokens(mx.array(ids)[None])
        return self.model.mtp(hidden, embeddings, self.cache, positions)


class ModelDrafter:
    """Drafts with a smaller model that shares the tokenizer (e.g. 0.8B for 9B). It reads the
    tokens (images only reach the main model) into its own cache; each round it feeds the
    model's pending token and its own drafts, and `feed` then rolls it back to the tokens the
    model kept."""

    def __init__(self, draft_model, model, draft_tokenizer=None, tokenizer=None):
        check_same_vocabulary(draft_model, model, draft_tokenizer, tokenizer)
        self.model = draft_model
        self.cache = draft_model.make_cache()
        self.queued: list[int] = []  # consumed by the model, not yet by the drafter
        self.round: list = []  # cache snapshots after the round's token and each fed draft
        self.round_drafts: mx.array | None = None

    def start(self, offset: int, rope_delta: int) -> None:
        """A restored prefix of the model's is not known to the drafter: it drafts from what
        follows."""

    def feed(self, ids: list[int], hidden=None, position_ids=None) -> None:
        """Tokens the model consumed; after a round: the round's token and the kept drafts."""
        if not self.round:
            self.queued.extend(ids)
            return
        drafts = self.round_drafts.tolist()
        fed = 1 + min(len(ids) - 1, len(self.round) - 1)  # the round's token, kept drafts fed
        if ids[1:fed] != drafts[: fed - 1]:
            raise ValueError("the kept tokens are not the drafted ones")
        self.cache.restore(self.round[fed - 1], owned=True)
        self.queued.extend(ids[fed:])
        self.round = []

    @property
    def state(self) -> list:
        if self.queued:
            self._forward(mx.array(self.queued))
            self.queued = []
        return self.cache.state

    def draft(self, token: int, k: int, distribution: Callable | None):
        """As `MTPDrafter.draft`."""
        logits = self._forward(mx.array([*self.queued, token]))
        self.queued = []
        self.round = [self.cache.snapshot()]

        def next_logits(step: int, draft: mx.array) -> mx.array:
            logits = self._forward(draft.reshape(1))
            self.round.append(self.cache.snapshot())
            return logits[0, -1]

        self.round_drafts, sampled_from = draft_chain(logits[0, -1], next_logits, k, distribution)
        return self.round_drafts, sampled_from

    def _forward(self, tokens: mx.array) -> mx.array:
        logits = self.model(tokens[None], cache=self.cache, check_ids=False)
        self.cache.append([-1] * tokens.size)  # the drafter never reads its cache's ids
        return logits


def check_same_vocabulary(draft_model, model, draft_tokenizer=None, tokenizer=None) -> None:
    """ValueError unless the draft model's token ids mean what the model's do."""
    ours, theirs = model.config.text.vocab_size, draft_model.config.text.vocab_size
    advice = "a draft model must share the model's tokenizer (e.g. Qwen3.5-0.8B for Qwen3.5-9B)"
    if ours != theirs:
        raise ValueError(
            f"the draft model's vocabulary has {theirs} tokens, the model's {ours}: {advice}"
        )
    tokenizers = (draft_tokenizer, tokenizer)
    if None not in tokenizers and draft_tokenizer.vocabulary() != tokenizer.vocabulary():
        raise ValueError(f"the draft model's tokenizer differs from the model's: {advice}")


@dataclass
class Speculation:
    """What `generate_step` speculates with: a drafter, the most tokens a round drafts, and
    whether k adapts to the measured acceptance and costs; `stats` fills as it runs."""

    drafter: object
    num_draft_tokens: int = 3
    adaptive: bool = True
    rollback: str = "steps"  # or "refeed": see `verify`
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    def __post_init__(self):
        if self.rollback not in ROLLBACKS:
            raise ValueError(f"rollback must be one of {ROLLBACKS}, got {self.rollback!r}")
        self.policy = DraftPolicy(self.num_draft_tokens, self.adaptive)


def make_speculation(
    model,
    tokenizer,
    *,
    mtp: bool = False,
    draft_model=None,
    num_draft_tokens: int = 3,
    adaptive: bool = True,
) -> Speculation | None:
    """The `Speculation` that `stream_generate`'s arguments ask for; None for plain decoding.
    `draft_model`: a model, or the (model, tokenizer) pair `load` returns (then the tokenizers
    are compared too)."""
    check_num_draft_tokens(num_draft_tokens)
    if mtp and draft_model is not None:
        raise ValueError("draft with the MTP head (mtp=True) or a draft model, not both")
    if mtp:
        return Speculation(MTPDrafter(model), num_draft_tokens, adaptive)
    if draft_model is None:
        return None
    draft, draft_tokenizer = draft_model if isinstance(draft_model, tuple) else (draft_model, None)
    if not hasattr(draft, "make_cache"):
        raise ValueError(
            f"draft_model takes a loaded model (or the (model, tokenizer) pair of "
            f"qwen35_mlx.load), got {type(draft).__name__}: load it first, e.g. "
            "draft_model=load('Qwen/Qwen3.5-0.8B')"
        )
    drafter = ModelDrafter(draft, model, draft_tokenizer, tokenizer)
    return Speculation(drafter, num_draft_tokens, adaptive)


def speculative_decode(
    model,
    cache,
    speculation: Speculation,
    *,
    token: int,
    logprobs: mx.array,
    max_tokens: int,
    distribution: Callable | None,
    logits_processors: Sequence[LogitsProcessor],
    generated: list[int],
    feed: Callable,
    decode_inputs: dict,
) -> Generator[tuple[int, mx.array], None, tuple[int, mx.array, int] | None]:
    """Yields (token, log-probabilities [vocab]) from the prompt's first sampled `token` on.
    Returns None when done, or, when the measured costs rule drafting out on this machine,
    (the next token, its log-probabilities, tokens emitted) for plain decoding to go on from.

    `feed(tokens [T], ids, keys, inputs)` runs the model on the cache (rolled back if it
    raises) and records the ids; `generated` is the shared list the logits processors read.
    """
    drafter, policy, stats = speculation.drafter, speculation.policy, speculation.stats
    emitted = 0
    while True:
        if policy.ruled_out():
            stats.stopped_after = emitted
            return token, logprobs, emitted
        generated.append(token)
        emitted += 1
        yield token, logprobs
        if emitted == max_tokens:
            return
        start = time.perf_counter()
        k = policy.choose(max_tokens - emitted)
        stats.num_draft_tokens, stats.expected_speedup = k, policy.speedup(k) if k else 1.0
        if k == 0:
            logits, hidden = feed(mx.array([token]), [token], [token], decode_inputs)
            drafter.feed([token], hidden)
            rows = processed(logits[0], generated, [], logits_processors)
            accepted, drafts = 0, []
            token = plain_next(rows[0], distribution)
        else:
            accepted, drafts, token, rows = verify(
                model, cache, speculation, token, k, distribution, logits_processors,
                generated, feed, decode_inputs,
            )  # fmt: skip
        mx.eval(cache.state)  # the drafter's share runs with its next draft
        policy.update(k, accepted, time.perf_counter() - start)
        stats.record(k, accepted)
        for i, drafted in enumerate(drafts[:accepted]):
            generated.append(drafted)
            emitted += 1
            yield drafted, rows[i]
        logprobs = rows[accepted]


def verify(
    model, cache, speculation, token, k, distribution, logits_processors, generated, feed, inputs
):
    """One round: k drafts after `token`, checked in one forward pass of the model. Returns
    (drafts kept, the drafts, the next token, the model's log-probabilities [k+1, vocab]); the
    cache then holds `token` and the kept drafts.

    Rolling back the rejected drafts: "steps" has the DeltaNet layers keep each token's state
    during the verify pass (the per-token recurrence, k+1 states per layer held until the round
    ends) and picks the kept one; "refeed" restores the snapshot from before the pass and feeds
    the kept tokens again (a second forward pass, when a draft was rejected).
    """
    drafter, by_steps = speculation.drafter, speculation.rollback == "steps"
    draft_tokens, draft_logprobs = drafter.draft(token, k, distribution)
    before = cache.snapshot()
    cache.record_steps(by_steps)
    try:  # an error or KeyboardInterrupt anywhere in the round leaves the cache as before it
        logits, hidden = model(  # inputs ask for the hidden states too
            mx.concatenate([mx.array([token]), draft_tokens])[None], cache=cache, **inputs
        )
        drafts = draft_tokens.tolist()
        rows = processed(logits[0], generated, drafts, logits_processors)
        if distribution is None:
            accepted, following = accept_greedy(drafts, rows)
        else:
            accepted, following = accept_sampled(drafts, draft_logprobs, distribution(rows))
        kept = [token, *drafts[:accepted]]
        if accepted < k and by_steps:
            cache.drop_last(k - accepted)
        if accepted < k and not by_steps:
            cache.restore(before, owned=True)
            feed(mx.array(kept), kept, kept, inputs)
        else:
            cache.append(kept)
    except BaseException:
        cache.restore(before, owned=True)
        raise
    finally:
        cache.record_steps(False)
    drafter.feed(kept, hidden[:, : accepted + 1])
    return accepted, drafts, following, rows


def processed(logits: mx.array, generated: list[int], drafts: list[int], processors) -> mx.array:
    """Log-probabilities [T, vocab] of logits [T, vocab], row i after the logits processors
    saw `generated` and the first i drafts (as plain decoding would have shown them)."""
    if processors:
        rows = []
        for i in range(logits.shape[0]):
            row = logits[i : i + 1]
            for process in processors:
                row = process(generated + drafts[:i], row)
            rows.append(row)
        logits = mx.concatenate(rows, axis=0)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def plain_next(logprobs: mx.array, distribution: Callable | None) -> int:
    """The next token without drafting, as the sampler would draw it."""
    return int(pick(logprobs, distribution, []).item())
