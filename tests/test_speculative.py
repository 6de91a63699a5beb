"""Speculative decoding: the output of plain decoding (greedy: the same tokens; sampling: the
same distribution), a cache that holds exactly the kept tokens, the draft policy's choices."""

import math
import time

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen35_mlx import cli, generate_step, load, stream_generate
from qwen35_mlx.bench.mtp_training import prompts
from qwen35_mlx.prompt_cache import PrefixCache
from qwen35_mlx.sampling import Penalties, make_distribution, make_sampler
from qwen35_mlx.speculative import (
    ROLLBACKS,
    DraftPolicy,
    ModelDrafter,
    MTPDrafter,
    Speculation,
    accept_sampled,
)

from checkpoints import Spec

PROMPT = np.random.default_rng(3).integers(0, 496, size=23).tolist()


@pytest.fixture(scope="module", params=["causal", "conditional"])
def tiny(request, make_checkpoint):
    directory, _ = make_checkpoint(Spec(layout=request.param))
    return load(directory)


class ScriptedDrafter:
    """Drafts from a known continuation: the next tokens of `expected` (always right), or each
    shifted by one (always wrong)."""

    def __init__(self, expected: list[int], vocab: int, right: bool):
        self.expected, self.vocab, self.right = expected, vocab, right
        self.consumed = 0

    def start(self, offset, rope_delta):
        self.consumed = offset

    def feed(self, ids, hidden=None, position_ids=None):
        self.consumed += len(ids)

    @property
    def state(self):
        return []

    def draft(self, token, k, distribution):
        at = self.consumed + 1  # after the fed tokens and `token`
        upcoming = (self.expected[at:] + [0] * k)[:k]
        shift = 0 if self.right else 1
        return mx.array([(t + shift) % self.vocab for t in upcoming]), None


def plain(model, max_tokens, prompt=PROMPT, **kwargs):
    cache = model.make_cache()
    tokens = [
        t
        for t, _ in generate_step(
            mx.array(prompt), model, cache=cache, max_tokens=max_tokens, **kwargs
        )
    ]
    return tokens, cache


def speculative(
    model, drafter, k, max_tokens, adaptive=False, rollback="steps", prompt=PROMPT, **kwargs
):
    cache = model.make_cache()
    speculation = Speculation(drafter, num_draft_tokens=k, adaptive=adaptive, rollback=rollback)
    steps = generate_step(
        mx.array(prompt),
        model,
        cache=cache,
        max_tokens=max_tokens,
        speculation=speculation,
        **kwargs,
    )
    return [t for t, _ in steps], cache, speculation.stats


def assert_same_cache(cache, expected):
    """The same tokens, and every layer's state within 1e-5 (relative to its largest value)."""
    assert cache.tokens == expected.tokens
    for ours, theirs in zip(cache, expected, strict=True):
        ours, theirs = ours.snapshot().arrays(), theirs.snapshot().arrays()  # KV trimmed
        assert ours.keys() == theirs.keys()
        for name, expected_array in theirs.items():
            error = np.abs(np.array(ours[name]) - np.array(expected_array)).max()
            assert error <= 1e-5 * max(1.0, np.abs(np.array(expected_array)).max()), name


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("right", [True, False], ids=["always-right", "always-wrong"])
@pytest.mark.parametrize("rollback", ROLLBACKS)
def test_greedy_output_is_plain_greedy(tiny, k, right, rollback):
    model, _ = tiny
    expected, plain_cache = plain(model, 64)
    vocab = model.config.text.vocab_size
    drafter = ScriptedDrafter(PROMPT + expected, vocab, right)
    tokens, cache, stats = speculative(model, drafter, k, 64, rollback=rollback)
    assert tokens == expected
    assert_same_cache(cache, plain_cache)  # the tokens alone hardly depend on the context
    assert stats.drafted > 0
    assert stats.accepted == (stats.drafted if right else 0)
    if right:  # every round emits k + 1 tokens
        assert stats.rounds <= math.ceil(63 / (k + 1))


@pytest.mark.parametrize("rollback", ROLLBACKS)
def test_cache_after_rejections_equals_decoding_one_by_one(tiny, rollback):
    model, _ = tiny
    expected, plain_cache = plain(model, 20)
    # wrong from the third draft of each round on: kept prefixes of 0, 1 and 2 tokens
    drafter = ScriptedDrafter(PROMPT + expected, model.config.text.vocab_size, right=True)
    drafts = drafter.draft

    def partly_wrong(token, k, distribution):
        tokens, _ = drafts(token, k, distribution)
        return mx.concatenate([tokens[:2], (tokens[2:] + 1) % 512]), None

    drafter.draft = partly_wrong
    tokens, cache, stats = speculative(model, drafter, 4, 20, rollback=rollback)
    assert tokens == expected
    assert 0 < stats.accepted < stats.drafted
    assert_same_cache(cache, plain_cache)


def test_penalties_see_the_history_plain_decoding_shows_them(tiny):
    model, _ = tiny
    penalties = dict(repetition=1.3, presence=0.5, frequency=0.2)
    expected, _ = plain(model, 40, logits_processors=[Penalties(**penalties)])
    drafter = ScriptedDrafter(PROMPT + expected, model.config.text.vocab_size, right=True)
    tokens, _, stats = speculative(
        model, drafter, 3, 40, logits_processors=[Penalties(**penalties)]
    )
    assert tokens == expected and stats.accepted == stats.drafted


def test_model_drafter_greedy(tiny, make_checkpoint):
    model, _ = tiny
    expected, _ = plain(model, 48)
    other, _ = load(make_checkpoint(Spec(seed=1))[0])  # another model, the same vocabulary
    for draft_model, everything_kept in ((model, True), (other, False)):
        drafter = ModelDrafter(draft_model, model)
        tokens, _, stats = speculative(model, drafter, 3, 48)
        assert tokens == expected
        assert (stats.accepted == stats.drafted) == everything_kept


def test_accept_sampled_has_the_target_distribution():
    """Chi-square goodness of fit of the emitted token to p, for a q far from p."""
    mx.random.seed(0)
    p = mx.log(mx.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3]]))
    q = mx.log(mx.array([[0.05, 0.05, 0.3, 0.3, 0.3]]))
    trials, counts = 6000, np.zeros(5)
    for _ in range(trials):
        draft = int(mx.random.categorical(q[0]).item())
        accepted, following = accept_sampled([draft], q, p)
        counts[draft if accepted else following] += 1
    expected = trials * np.exp(np.array(p[0]))
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 18.5  # the 0.999 quantile with 4 degrees of freedom


def test_sampled_speculation_has_the_plain_sampler_distribution(make_checkpoint):
    """Two-sample chi-square over the second and third tokens, plain vs speculative."""
    model, _ = load(make_checkpoint(Spec())[0])
    other, _ = load(make_checkpoint(Spec(seed=1))[0])
    settings = dict(temp=1.0, top_k=3)
    sampler, distribution = make_sampler(**settings), make_distribution(**settings)
    plain_counts, ours_counts = {}, {}
    for seed in range(300):
        mx.random.seed(seed)
        tokens, _ = plain(model, 3, sampler=sampler)
        plain_counts[tuple(tokens[1:])] = plain_counts.get(tuple(tokens[1:]), 0) + 1
        mx.random.seed(10_000 + seed)
        tokens, _, _ = speculative(
            model, ModelDrafter(other, model), 2, 3, sampler=sampler, distribution=distribution
        )
        ours_counts[tuple(tokens[1:])] = ours_counts.get(tuple(tokens[1:]), 0) + 1
    cells = sorted(set(plain_counts) | set(ours_counts))
    a = np.array([plain_counts.get(c, 0) for c in cells], float)
    b = np.array([ours_counts.get(c, 0) for c in cells], float)
    pooled = (a + b) / 2
    chi2 = (((a - pooled) ** 2 + (b - pooled) ** 2) / pooled).sum()
    dof = len(cells) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 10  # far inside: a wrong law gives hundreds


def test_sampling_without_its_distribution_is_refused(tiny):
    model, _ = tiny
    drafter = ScriptedDrafter(PROMPT, 512, right=True)
    with pytest.raises(ValueError, match="distribution="):
        list(speculative(model, drafter, 2, 4, sampler=make_sampler(temp=0.7))[0])


@pytest.mark.parametrize("k", [0, -1, 17, 2.0, True])
def test_bad_num_draft_tokens(k):
    with pytest.raises(ValueError, match="num_draft_tokens must be a whole number from 1 to 16"):
        Speculation(object(), num_draft_tokens=k)


def test_draft_model_with_another_vocabulary_is_refused(tiny, make_checkpoint):
    model, _ = tiny

    class Config:
        class text:
            vocab_size = 1000

    class Other:
        config = Config

    with pytest.raises(ValueError, match="vocabulary has 1000 tokens, the model's 512"):
        ModelDrafter(Other(), model)


def test_policy_picks_the_fastest_expected_k():
    policy = DraftPolicy(4)
    assert policy.choose(100) == 0  # first plain, for the baseline
    policy.update(0, 0, 1.0)
    assert policy.choose(100) == 1  # then the cheapest drafting round
    policy.update(1, 1, 1.1)
    # the rest extrapolated (1.0 + 0.1 k s), the first position's rate 2/3, the untried ones
    # at the prior's 1/2: k = 2 expects 2 tokens in 1.2 s, the most per second
    assert policy.speedup(2) == pytest.approx(2.0 / 1.2)
    assert policy.choose(100) == 2
    for _ in range(60):  # the first draft is always kept, the second never
        policy.update(2, 1, 1.2)
    # k = 1: 2 tokens in 1.1 s beats k = 2: about 2 tokens in 1.2 s, and plain: 1 in 1.0 s
    assert policy.choose(100) == 1
    assert policy.speedup(1) == pytest.approx(policy.expected_tokens(1) / 1.1)
    assert policy.choose(1) == 0  # no room for a draft and the token after it


def test_policy_probes_less_and_less_while_drafting_does_not_pay():
    policy = DraftPolicy(3)
    policy.update(0, 0, 1.0)
    for _ in range(60):
        policy.update(1, 0, 1.2)  # nothing kept, though a kept draft would have paid
    chosen = [policy.choose(100) for _ in range(100)]
    probes = [n for n, k in enumerate(chosen) if k]
    assert probes == [15, 47]  # after 16 plain rounds, then 32
    assert set(chosen) == {0, 1}


def test_policy_never_probes_when_the_costs_rule_drafting_out():
    policy = DraftPolicy(4)
    policy.update(0, 0, 1.0)
    policy.update(1, 1, 2.5)  # a round of one draft costs 2.5 plain steps and yields at most 2
    assert not any(policy.could_pay(k) for k in range(1, 5))
    assert policy.ruled_out()


def test_generation_goes_on_plainly_when_drafting_cannot_pay(tiny):
    """A drafter so slow that even all-kept drafts lose: after the baseline round and one
    drafting round, decoding goes on without drafting, to the same tokens."""
    model, _ = tiny
    expected, plain_cache = plain(model, 40)
    drafter = ScriptedDrafter(PROMPT + expected, model.config.text.vocab_size, right=True)
    drafts = drafter.draft

    def slow(token, k, distribution):
        time.sleep(0.3)
        return drafts(token, k, distribution)

    drafter.draft = slow
    tokens, cache, stats = speculative(model, drafter, 3, 40, adaptive=True)
    assert tokens == expected
    assert_same_cache(cache, plain_cache)
    assert (stats.plain_steps, stats.rounds, stats.accepted, stats.stopped_after) == (1, 1, 1, 3)
    assert stats.summary().endswith(
        "drafting stopped after 3 tokens: the measured costs say it cannot pay on this machine"
    )


@pytest.mark.parametrize("rollback", ROLLBACKS)
def test_an_interrupted_round_leaves_the_cache_as_before_it(tiny, rollback):
    model, _ = tiny
    expected, _ = plain(model, 30)
    drafter = ScriptedDrafter(PROMPT + expected, model.config.text.vocab_size, right=False)
    calls = []

    def interrupt_on_the_ninth_call(generated, logits):
        calls.append(len(generated))
        if len(calls) == 9:  # inside a verify round's rows
            raise KeyboardInterrupt
        return logits

    cache = model.make_cache()
    speculation = Speculation(drafter, num_draft_tokens=3, adaptive=False, rollback=rollback)
    steps = generate_step(
        mx.array(PROMPT),
        model,
        cache=cache,
        max_tokens=30,
        speculation=speculation,
        logits_processors=[interrupt_on_the_ninth_call],
    )
    with pytest.raises(KeyboardInterrupt):
        list(steps)
    fresh = model.make_cache()
    model(mx.array(cache.tokens)[None], cache=fresh)
    fresh.append(cache.tokens)
    assert len(cache.tokens) > len(PROMPT)
    assert_same_cache(cache, fresh)


# ---------------------------------------------------------------------------------------------
# The MTP head as drafter: trained on the tiny models' own greedy output (tests/mtp_training.py)


@pytest.fixture(scope="module", params=["causal", "conditional"])
def trained(request, trained_mtp_checkpoint):
    return load(trained_mtp_checkpoint(Spec(layout=request.param)))


# a prompt like those the head was trained on: 8 random ordinary tokens
TRAINED_PROMPT = prompts(1, seed=1, below=496)[0].tolist()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_mtp_greedy_is_plain_greedy(trained, k):
    model, _ = trained
    expected, plain_cache = plain(model, 64, TRAINED_PROMPT)
    tokens, cache, stats = speculative(model, MTPDrafter(model), k, 64, prompt=TRAINED_PROMPT)
    assert tokens == expected
    assert_same_cache(cache, plain_cache)
    assert stats.acceptance > 0.5, stats.summary()  # the trained head drafts well


def test_mtp_with_an_image_prompt_penalties_and_the_prefix_cache(trained_mtp_checkpoint, tmp_path):
    model, tokenizer = load(trained_mtp_checkpoint(Spec(layout="conditional")))
    image = tmp_path / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": str(image)}, "Describe it."]}
    ]
    messages[0]["content"][1] = {"type": "text", "text": "Describe it."}
    settings = dict(max_tokens=40, presence_penalty=0.5, frequency_penalty=0.1)
    expected = [r.token for r in stream_generate(model, tokenizer, messages, **settings)]
    prefixes = PrefixCache()
    for turn in range(2):  # the second call starts from the cached prefix
        responses = list(
            stream_generate(model, tokenizer, messages, mtp=True, prompt_cache=prefixes, **settings)
        )
        assert [r.token for r in responses] == expected
        assert (responses[-1].cached_tokens > 0) == (turn == 1)
        assert responses[-1].speculative.drafted > 0


def test_mtp_on_a_checkpoint_without_a_head_is_refused(tiny, capsys):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"no MTP head \(no mtp\.\* tensors\)"):
        next(stream_generate(model, tokenizer, "Hello", mtp=True))


def test_cli_prints_what_drafting_did(trained_mtp_checkpoint, capsys):
    directory = trained_mtp_checkpoint()
    args = ["generate", "--model", str(directory), "--prompt", "Hi", "--max-tokens", "24"]
    assert cli.main([*args, "--mtp", "--num-draft-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "speculative: drafted" in err and "accepted" in err
    assert cli.main([*args, "--mtp", "--num-draft-tokens", "0"]) == 2
    assert "num_draft_tokens must be a whole number from 1 to 16, got 0" in capsys.readouterr().err


def test_draft_model_with_another_tokenizer_is_refused(tiny):
    model, tokenizer = tiny

    class Renamed:  # the same ids, one token spelled differently
        def vocabulary(self):
            words = dict(tokenizer.vocabulary())
            word = next(iter(words))
            words[word + "x"] = words.pop(word)
            return words

    with pytest.raises(ValueError, match="the draft model's tokenizer differs from the model's"):
        stream_generate(model, tokenizer, "Hi", draft_model=(model, Renamed())).__next__()
    same = stream_generate(model, tokenizer, "Hi", draft_model=(model, tokenizer), max_tokens=9)
    assert list(same)[-1].speculative.drafted > 0  # its own tokenizer is accepted


def test_draft_model_given_as_a_path_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"draft_model takes a loaded model .* got str: load it"):
        next(stream_generate(model, tokenizer, "Hi", draft_model="/models/qwen35-0.8b"))
