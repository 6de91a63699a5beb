"""Continuous batching: every request gets what `stream_generate` gives it alone (greedy tokens,
seeded samples, text, finish reasons, prefix-cache reuse), whoever shares the batch and
whenever they join or leave; slots and limits."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen35_mlx import generate_step, load, stream_generate
from qwen35_mlx.batch import BatchGenerator
from qwen35_mlx.prompt import prepare_prompt
from qwen35_mlx.prompt_cache import PrefixCache

from checkpoints import Spec

LONG = "Tell me everything about the sea, the sky, the wind and the boats. " * 4


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    """float32, with a vision tower."""
    directory, _ = make_checkpoint(Spec(layout="conditional"))
    return load(directory)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "picture.png"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def user(text, image=None):
    items = [] if image is None else [{"type": "image", "image": str(image)}]
    return [{"role": "user", "content": [*items, {"type": "text", "text": text}]}]


def solo(tiny, prompt, **options):
    model, tokenizer = tiny
    return list(stream_generate(model, tokenizer, prompt, **options))


def run(generator):
    """uid -> its responses, stepping until every request finished."""
    out = {}
    while len(generator):
        for uid, response in generator.step():
            out.setdefault(uid, []).append(response)
    return out


def assert_same(batched, alone):
    assert [r.token for r in batched] == [r.token for r in alone]
    assert [(r.text, r.reasoning, r.finish_reason) for r in batched] == [
        (r.text, r.reasoning, r.finish_reason) for r in alone
    ]
    assert [(r.prompt_tokens, r.cached_tokens, r.generation_tokens) for r in batched] == [
        (r.prompt_tokens, r.cached_tokens, r.generation_tokens) for r in alone
    ]
    # B rows through one matmul may round otherwise than one row: float32 error only
    ours = np.stack([np.array(r.logprobs) for r in batched])
    theirs = np.stack([np.array(r.logprobs) for r in alone])
    assert np.abs(ours - theirs).max() < 1e-4


def test_rows_of_different_lengths_get_their_solo_tokens(tiny, picture):
    prompts = [
        "Hi",
        LONG,  # prefilled in several chunks of 16, over several steps
        user("What is in this picture?", image=picture),  # M-RoPE shift of its own
        user("Write a haiku."),
        [5, 17, 300, 42],
    ]
    alone = [solo(tiny, prompt, max_tokens=14, prefill_step_size=16) for prompt in prompts]
    generator = BatchGenerator(*tiny, max_batch=8, prefill_step_size=16)
    uids = [generator.insert(prompt, max_tokens=14) for prompt in prompts]
    out = run(generator)
    for uid, expected in zip(uids, alone, strict=True):
        assert_same(out[uid], expected)
    model, tokenizer = tiny
    image_prompt = prepare_prompt(model, tokenizer, prompts[2])
    assert image_prompt.rope_delta != 0  # the image row really decodes at shifted positions


def test_joining_and_cancelled_rows_leave_the_others_unchanged(tiny):
    first, second, late = user("Count to ten."), "Once upon a time", user("Name three colours.")
    alone = {p: solo(tiny, q, max_tokens=16) for p, q in enumerate((first, second, late))}
    generator = BatchGenerator(*tiny, max_batch=2)
    a, b = generator.insert(first, max_tokens=16), generator.insert(second, max_tokens=16)
    c = generator.insert(late, max_tokens=16)  # waits: two slots
    out = {}
    for _ in range(5):
        for uid, response in generator.step():
            out.setdefault(uid, []).append(response)
    assert generator.active == [a, b] and c not in out
    generator.cancel(b)
    assert generator.active == [a] and len(generator) == 2  # b's slot is free at once
    events = generator.step()
    assert {uid for uid, _ in events} <= {a, c} and generator.active == [a, c]
    for uid, response in events:
        out.setdefault(uid, []).append(response)
    out = {**out, **{uid: out.get(uid, []) + more for uid, more in run(generator).items()}}
    assert_same(out[a], alone[0])
    assert_same(out[c], alone[2])
    assert [r.token for r in out[b]] == [r.token for r in alone[1][: len(out[b])]]
    with pytest.raises(KeyError, match="no request"):
        generator.cancel(b)


def test_seeded_sampling_and_penalties_per_row(tiny):
    settings = [
        {"temp": 0.9, "seed": 1},
        {"temp": 0.7, "top_p": 0.9, "seed": 2, "presence_penalty": 1.5},
        {"temp": 1.0, "top_k": 20, "min_p": 0.05, "seed": 3, "repetition_penalty": 1.3},
        {"frequency_penalty": 0.5},
    ]
    prompt = user("Tell me a story.")
    alone = [solo(tiny, prompt, max_tokens=12, **s) for s in settings]
    generator = BatchGenerator(*tiny)
    uids = [generator.insert(prompt, max_tokens=12, **s) for s in settings]
    out = run(generator)
    for uid, expected in zip(uids, alone, strict=True):
        assert_same(out[uid], expected)
    assert len({tuple(r.token for r in out[uid]) for uid in uids[:3]}) == 3


def test_stop_strings_and_max_tokens_per_row(tiny):
    prompt = user("Describe the weather.")
    text = "".join(r.text for r in solo(tiny, prompt, max_tokens=20))
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # reached mid-way
    settings = [{"stop": stop, "max_tokens": 20}, {"max_tokens": 3}, {"max_tokens": 20}]
    alone = [solo(tiny, prompt, **s) for s in settings]
    assert alone[0][-1].finish_reason == "stop" and len(alone[0]) < 20
    assert alone[1][-1].finish_reason == "length" and len(alone[1]) == 3
    generator = BatchGenerator(*tiny)
    uids = [generator.insert(prompt, **s) for s in settings]
    out = run(generator)
    for uid, expected in zip(uids, alone, strict=True):
        assert_same(out[uid], expected)


def test_logits_processors_per_row(tiny):
    model, tokenizer = tiny
    ids = [7, 8, 9, 10]
    banned = [token for token, _ in generate_step(mx.array(ids), model, max_tokens=6)][1]

    def ban(generated, logits):
        return logits.at[:, banned].add(-1e9)

    expected = [
        t for t, _ in generate_step(mx.array(ids), model, max_tokens=6, logits_processors=[ban])
    ]
    generator = BatchGenerator(model, tokenizer)
    free, processed = (
        generator.insert(ids, max_tokens=6),
        generator.insert(ids, max_tokens=6, logits_processors=[ban]),
    )
    out = run(generator)
    assert [r.token for r in out[processed]] == expected and banned not in expected
    assert banned in [r.token for r in out[free]]


def test_prefix_cache_across_requests(tiny):
    """A second turn resending the first pays only for the new tokens, as with
    stream_generate and a prefix cache of its own."""
    first = user("What is the capital of France?")

    def second(reply):
        return [*first, {"role": "assistant", "content": reply}, *user("And of Spain?")]

    prefixes = PrefixCache()
    reference = solo(tiny, first, max_tokens=8, prompt_cache=prefixes)
    reply = "".join(r.text for r in reference)
    expected = solo(tiny, second(reply), max_tokens=8, prompt_cache=prefixes)
    assert expected[0].cached_tokens > 0

    generator = BatchGenerator(*tiny, prompt_cache=PrefixCache())
    uid = generator.insert(first, max_tokens=8)
    assert "".join(r.text for r in run(generator)[uid]) == reply
    uid = generator.insert(second(reply), max_tokens=8)
    again = run(generator)[uid]
    assert_same(again, expected)  # cached_tokens included
    fresh = solo(tiny, second(reply), max_tokens=8)
    assert [r.token for r in again] == [r.token for r in fresh]


def test_max_batch_is_respected(tiny):
    generator = BatchGenerator(*tiny, max_batch=2)
    uids = [generator.insert(f"Request number {n}", max_tokens=4 + n) for n in range(4)]
    assert len(generator) == 4 and generator.active == []
    seen = []
    while len(generator):
        events = generator.step()
        assert len(generator.active) <= 2 and len(events) <= 2
        seen += [uid for uid, _ in events]
    assert set(seen) == set(uids)
    assert [seen.count(uid) for uid in uids] == [4, 5, 6, 7]


def test_bad_arguments_are_refused_at_insert(tiny):
    generator = BatchGenerator(*tiny)
    with pytest.raises(ValueError, match="max_tokens"):
        generator.insert("Hi", max_tokens=0)
    with pytest.raises(ValueError, match="temp"):
        generator.insert("Hi", temp=-1.0)
    with pytest.raises(ValueError, match="max_batch"):
        BatchGenerator(*tiny, max_batch=0)
    assert len(generator) == 0


def test_tools_reach_the_prompt(tiny):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    alone = solo(tiny, prompt, tools=tools, max_tokens=6)
    generator = BatchGenerator(*tiny)
    with_tools = generator.insert(prompt, tools=tools, max_tokens=6)
    without = generator.insert(prompt, max_tokens=6)
    out = run(generator)
    assert_same(out[with_tools], alone)
    assert out[with_tools][0].prompt_tokens > out[without][0].prompt_tokens


def test_a_step_interrupted_inside_the_model_is_undone(tiny):
    prompts = ["Hello there", user("Count to five.")]
    alone = [solo(tiny, prompt, max_tokens=10) for prompt in prompts]
    generator = BatchGenerator(*tiny)
    uids = [generator.insert(prompt, max_tokens=10) for prompt in prompts]
    out = {}
    for _ in range(3):
        for uid, response in generator.step():
            out.setdefault(uid, []).append(response)
    model, calls = generator.model, []

    def interrupted(*args, **kwargs):  # the batched decode call, halfway through the layers
        calls.append(1)
        layers = kwargs["cache"]
        model.language_model.model.layers[0](mx.zeros((2, 1, 64)), None, layers[0])
        raise KeyboardInterrupt

    generator.model = interrupted
    with pytest.raises(KeyboardInterrupt):
        generator.step()
    assert calls
    generator.model = model
    for uid, responses in run(generator).items():
        out[uid] += responses
    for uid, expected in zip(uids, alone, strict=True):
        assert_same(out[uid], expected)
