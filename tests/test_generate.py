"""Generation: greedy parity with transformers, sampling options, stops, reasoning, chat cache."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from qwen35_mlx import generate, generate_step, load, stream_generate
from qwen35_mlx.chat import ChatSession
from qwen35_mlx.generate import ContextLengthError
from qwen35_mlx.models.cache import KVCache
from qwen35_mlx.models.state import PromptCache
from qwen35_mlx.prompt import prompt_tokens
from qwen35_mlx.sampling import Penalties

from checkpoints import Spec

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    directory, reference = make_checkpoint(Spec())
    model, tokenizer = load(directory)
    return directory, reference, model, tokenizer


def reference_greedy(reference, ids, max_new_tokens, eos_token_id=None):
    reference.generation_config.eos_token_id = eos_token_id
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            eos_token_id=eos_token_id,
        )
    return out[0, len(ids) :].tolist()


def test_greedy_32_tokens_match_transformers(tiny):
    _, reference, model, _ = tiny
    ids = np.random.default_rng(1).integers(0, 496, size=70).tolist()  # prefill crosses 64
    ours = [token for token, _ in generate_step(mx.array(ids), model, max_tokens=32)]
    assert ours == reference_greedy(reference, ids, 32)


def test_chat_prompt_stops_like_transformers(tiny):
    directory, reference, model, tokenizer = tiny
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = hf_tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    stop_ids = sorted(tokenizer.eos_token_ids)
    expected = reference_greedy(reference, list(ids), 40, eos_token_id=stop_ids)
    responses = list(stream_generate(model, tokenizer, MESSAGES, max_tokens=40))
    assert [r.token for r in responses] == expected
    assert responses[-1].finish_reason == ("stop" if expected[-1] in stop_ids else "length")
    assert responses[-1].prompt_tokens == len(ids)


def test_prefill_step_size_does_not_change_tokens(tiny):
    *_, model, tokenizer = tiny
    ids = list(range(3, 150))
    whole = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=8)]
    chunked = [
        r.token for r in stream_generate(model, tokenizer, ids, max_tokens=8, prefill_step_size=7)
    ]
    assert chunked == whole


def test_seeded_sampling_is_reproducible(tiny):
    *_, model, tokenizer = tiny
    options = dict(max_tokens=16, temp=1.0, top_p=0.95, top_k=20, min_p=0.01)
    first = [r.token for r in stream_generate(model, tokenizer, MESSAGES, seed=7, **options)]
    again = [r.token for r in stream_generate(model, tokenizer, MESSAGES, seed=7, **options)]
    other = [r.token for r in stream_generate(model, tokenizer, MESSAGES, seed=8, **options)]
    assert first == again and first != other


def test_top_k_one_is_greedy(tiny):
    *_, model, tokenizer = tiny
    greedy = [r.token for r in stream_generate(model, tokenizer, MESSAGES, max_tokens=12)]
    sampled = [
        r.token
        for r in stream_generate(
            model, tokenizer, MESSAGES, max_tokens=12, temp=5.0, top_k=1, seed=3
        )
    ]
    assert sampled == greedy


def test_large_presence_penalty_forbids_repeats(tiny):
    *_, model, tokenizer = tiny
    greedy = [r.token for r in stream_generate(model, tokenizer, MESSAGES, max_tokens=30)]
    assert len(set(greedy)) < len(greedy), "the unpenalised model should repeat itself"
    penalised = [
        r.token
        for r in stream_generate(model, tokenizer, MESSAGES, max_tokens=30, presence_penalty=1e4)
    ]
    body = penalised[:-1] if penalised[-1] in tokenizer.eos_token_ids else penalised
    assert len(set(body)) == len(body)


def test_penalties_by_hand():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0, -2.0]])
    generated = [0, 1, 1, 3, 0, 0]  # counts: 3, 2, 0, 1, 0
    out = Penalties(repetition=2.0, presence=0.5, frequency=0.25)(generated, logits)
    expected = [2.0 / 2 - 0.5 - 0.75, -1.0 * 2 - 0.5 - 0.5, 0.5, 3.0 / 2 - 0.5 - 0.25, -2.0]
    np.testing.assert_allclose(np.array(out)[0], expected, rtol=1e-6)


def test_penalties_count_incrementally():
    penalties = Penalties(frequency=1.0)
    logits = mx.zeros((1, 4))
    penalties([2], logits)
    out = penalties([2, 2, 1], logits)
    np.testing.assert_allclose(np.array(out)[0], [0, -1, -2, 0])


def test_prompt_longer_than_context_is_an_error(make_checkpoint):
    directory, _ = make_checkpoint(Spec(max_position_embeddings=64))
    model, tokenizer = load(directory)
    with pytest.raises(ContextLengthError, match="65 tokens.*context window is 64"):
        next(stream_generate(model, tokenizer, list(range(65))))
    responses = list(stream_generate(model, tokenizer, list(range(60)), max_tokens=10))
    assert len(responses) == 4 and responses[-1].finish_reason == "length"


class ScriptedModel:
    """Predicts `script` after a prompt of `prompt_length` tokens, whatever the tokens are:
    drives the text side of generation. The position, read off the cache, picks the token."""

    def __init__(self, script, prompt_length, vocab, model):
        self.script, self.prompt_length, self.vocab = script, prompt_length, vocab
        # the real model's config and weights: the memory check plans for them
        self.config, self.parameters = model.config, model.parameters

    fingerprint = "scripted"

    def make_cache(self, **kv):
        return PromptCache([KVCache()], self.fingerprint)

    def check_token_ids(self, ids):
        pass  # any ids: the script decides the tokens

    def __call__(self, tokens, cache=None, **_):
        cache[0].update_and_fetch(*(mx.zeros((1, 1, tokens.shape[1], 2)),) * 2)
        index = min(cache[0].offset - self.prompt_length, len(self.script) - 1)
        logits = mx.zeros((1, tokens.shape[1], self.vocab))
        return logits.at[:, -1, self.script[max(index, 0)]].add(10.0)


@pytest.mark.parametrize("enable_thinking", [True, None], ids=["explicit", "template-default"])
def test_reasoning_is_returned_apart_from_the_answer(make_checkpoint, enable_thinking):
    directory, _ = make_checkpoint(Spec(thinking_by_default=True))
    model, tokenizer = load(directory)
    script = tokenizer.encode("Let me think.</think>\n\nThe answer.<|im_end|>")
    length = len(prompt_tokens(tokenizer, MESSAGES, enable_thinking))
    scripted = ScriptedModel(script, length, 512, model)
    result = generate(
        scripted, tokenizer, MESSAGES, enable_thinking=enable_thinking, max_tokens=100
    )
    assert (result.reasoning, result.text) == ("Let me think.", "The answer.")
    assert result.finish_reason == "stop" and result.generation_tokens == len(script)


def test_non_thinking_prompt_is_all_answer(tiny):
    *_, model, tokenizer = tiny  # 0.8B/2B-style template: no thinking by default
    script = tokenizer.encode("Hello there!<|endoftext|>")
    scripted = ScriptedModel(script, len(prompt_tokens(tokenizer, MESSAGES)), 512, model)
    result = generate(scripted, tokenizer, MESSAGES)
    assert (result.reasoning, result.text, result.finish_reason) == ("", "Hello there!", "stop")


class CountingModel:
    """Wraps a model and records how many tokens each forward pass was fed."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, cache=None, **kwargs):
        self.fed.append(tokens.shape[1])
        return self.model(tokens, cache=cache, **kwargs)


def test_chat_turn_is_a_fresh_render_and_feeds_only_what_is_new(tiny):
    *_, model, tokenizer = tiny
    counting = CountingModel(model)
    session = ChatSession(counting, tokenizer, max_tokens=6)
    first = [r.token for r in session.send("Hello")]
    assert first == [
        r.token for r in stream_generate(model, tokenizer, session.messages[:1], max_tokens=6)
    ]
    counting.fed.clear()
    second = [r.token for r in session.send("And now?")]
    history = session.messages[:3]
    # what a stateless client gets for the whole history, rendered by the chat template
    assert second == [r.token for r in stream_generate(model, tokenizer, history, max_tokens=6)]
    # the history up to the last reply's start came from the cache
    ids = tokenizer.encode(tokenizer.apply_chat_template(history))
    reply_start = len(tokenizer.encode(tokenizer.apply_chat_template(history[:1])))
    message_start = tokenizer.encode("<|im_start|>")[0]
    reply_start = max(i for i in range(reply_start) if ids[i] == message_start)
    assert sum(counting.fed) <= len(ids) - reply_start + len(second)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2


def test_undo_and_retry_roll_the_conversation_back(tiny):
    *_, model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_tokens=5, temp=1.0, seed=3)
    list(session.send("Hello"))
    list(session.send("More"))
    assert session.undo()["content"] == "More"
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    retried = "".join(r.text for r in session.retry())
    assert session.messages[-1]["content"] == retried
    fresh = "".join(
        r.text
        for r in stream_generate(
            model, tokenizer, session.messages[:1], max_tokens=5, temp=1.0, seed=3
        )
    )
    assert retried == fresh  # the same seed from the same rendered prompt
    session.messages[0]["content"] = "Goodbye"  # edit an earlier message, then reply again
    del session.messages[1:]
    edited = [r.token for r in session.reply()]
    assert edited == [
        r.token
        for r in stream_generate(
            model,
            tokenizer,
            [{"role": "user", "content": "Goodbye"}],
            max_tokens=5,
            temp=1.0,
            seed=3,
        )
    ]
