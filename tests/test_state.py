"""Conversation state: snapshots restore exactly, interrupted generation leaves the cache as it
was, and the prefix cache reuses what it holds without changing a single token."""

import threading

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen35_mlx import generate, load, stream_generate
from qwen35_mlx.generate import ContextLengthError
from qwen35_mlx.prompt_cache import PrefixCache, load_prompt_cache, save_prompt_cache

from checkpoints import Spec
from metrics import relative_error

LAYOUTS = {"causal": Spec(), "conditional": Spec(layout="conditional")}
VOCAB = 496  # ids below the tiny tokenizer's special tokens


@pytest.fixture(scope="module", params=LAYOUTS, ids=LAYOUTS)
def tiny(request, make_checkpoint):
    directory, _ = make_checkpoint(LAYOUTS[request.param])
    return load(directory, dtype="float32")


def logits(model, cache, ids) -> np.ndarray:
    """Logits [T, vocab] of `ids` fed after what `cache` holds, recorded on it."""
    out = model(mx.array([ids]), cache=cache)
    cache.append(list(ids))
    return np.array(out[0])


def states(cache) -> list[np.ndarray]:
    """What the cache holds, trimmed to its tokens: KV up to the offset, DeltaNet states."""
    arrays = []
    for layer in cache:
        if hasattr(layer, "offset"):
            keys, values = layer.state
            arrays += [
                np.array(keys[..., : layer.offset, :]),
                np.array(values[..., : layer.offset, :]),
            ]
        else:
            arrays += [np.array(a) for a in layer.state]
    return arrays


def assert_same_state(cache, reference):
    assert cache.tokens == reference.tokens and cache.rope_delta == reference.rope_delta
    for ours, theirs in zip(states(cache), states(reference), strict=True):
        assert ours.shape == theirs.shape and relative_error(ours, theirs) <= 1e-6


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_restore_and_continue_equals_a_fresh_run(tiny, data):
    model, _ = tiny
    length = data.draw(st.integers(4, 40), label="length")
    ids = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length))
    split = data.draw(st.integers(1, length - 1), label="split")
    detour = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30))
    fresh = logits(model, model.make_cache(), ids)

    cache = model.make_cache()
    logits(model, cache, ids[:split])
    snapshot = cache.snapshot()
    logits(model, cache, detour)  # another branch, written after the snapshot
    later = cache.snapshot()
    cache.restore(snapshot)
    assert relative_error(logits(model, cache, ids[split:]), fresh[split:]) <= 1e-5
    branch = model.make_cache()  # the other branch is intact too
    branch.restore(later)
    reference = model.make_cache()
    logits(model, reference, ids[:split] + detour)
    assert_same_state(branch, reference)


class Explode(Exception):
    pass


def explode_in_layer(model, monkeypatch, layer_index: int, after_calls: int):
    """Make the `layer_index`-th decoder layer raise on its call number `after_calls` + 1."""
    layer = model.layers[layer_index]
    calls = []
    original = type(layer).__call__

    def call(self, *args, **kwargs):
        if self is layer:
            calls.append(1)
            if len(calls) > after_calls:
                raise Explode
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(layer), "__call__", call)


@pytest.mark.parametrize("after_calls", [0, 1, 3], ids=["prefill", "first-step", "decoding"])
@pytest.mark.parametrize("error", [Explode, KeyboardInterrupt])
def test_an_error_inside_the_model_rolls_back_its_step(tiny, monkeypatch, after_calls, error):
    model, tokenizer = tiny
    history = [5, 6, 7, 8, 9]
    cache = model.make_cache()
    logits(model, cache, history)
    explode_in_layer(model, monkeypatch, layer_index=2, after_calls=after_calls)
    if error is KeyboardInterrupt:
        monkeypatch.setattr(Explode, "__new__", lambda cls, *a: KeyboardInterrupt())
    fed = []
    with pytest.raises((Explode, KeyboardInterrupt)):
        for response in stream_generate(
            model, tokenizer, [11, 12, 13, 14], cache=cache, max_tokens=8, prefill_step_size=2
        ):
            fed.append(response.token)
    monkeypatch.undo()
    # every layer holds the same tokens: those fed before the failing call
    reference = model.make_cache()
    logits(model, reference, cache.tokens)
    assert_same_state(cache, reference)
    assert cache.tokens[: len(history)] == history


def test_a_consumer_that_stops_reading_leaves_a_consistent_cache(tiny):
    model, tokenizer = tiny
    cache = model.make_cache()
    responses = stream_generate(model, tokenizer, [20, 21, 22], cache=cache, max_tokens=10)
    seen = [next(responses).token for _ in range(3)]
    responses.close()
    assert cache.tokens[:6] == [20, 21, 22, *seen]  # and maybe the token queued after them
    reference = model.make_cache()
    logits(model, reference, cache.tokens)
    assert_same_state(cache, reference)


def test_a_context_length_error_changes_nothing(make_checkpoint):
    directory, _ = make_checkpoint(Spec(max_position_embeddings=64))
    model, tokenizer = load(directory)
    cache = model.make_cache()
    logits(model, cache, list(range(40)))
    before = states(cache)
    with pytest.raises(ContextLengthError):
        next(stream_generate(model, tokenizer, list(range(30)), cache=cache))
    assert cache.offset == 40
    for ours, theirs in zip(states(cache), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_snapshot_is_refused_by_another_model(make_checkpoint, tiny):
    model, _ = tiny
    other, _ = load(make_checkpoint(Spec(hv_per_hk=1))[0])
    cache = model.make_cache()
    logits(model, cache, [1, 2, 3])
    with pytest.raises(ValueError, match="taken from another model"):
        other.make_cache().restore(cache.snapshot())


def history(turns: list[str], replies: list[str]) -> list[dict]:
    messages = []
    for user, reply in zip(turns, replies + [None]):
        messages.append({"role": "user", "content": user})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return messages


def test_a_resent_history_reuses_the_cache_and_changes_no_token(tiny):
    model, tokenizer = tiny
    prefixes = PrefixCache()
    turns, replies = ["Tell me about octopuses.", "And squids?", "Which is larger?"], []
    for turn in range(len(turns)):
        messages = history(turns[: turn + 1], replies)
        plain = generate(model, tokenizer, messages, max_tokens=12)
        cached = generate(model, tokenizer, messages, max_tokens=12, prompt_cache=prefixes)
        assert cached.text == plain.text and cached.finish_reason == plain.finish_reason
        assert cached.prompt_tokens == plain.prompt_tokens
        if turn:  # the history up to the last reply came from the cache: the template
            # renders a past reply unlike the generation prompt it followed
            previous = tokenizer.encode(
                tokenizer.apply_chat_template(
                    history(turns[:turn], replies[: turn - 1]), add_generation_prompt=True
                )
            )
            message_start = tokenizer.encode("<|im_start|>")[0]
            last_start = len(previous) - 1 - previous[::-1].index(message_start)
            assert cached.cached_tokens >= last_start
        replies.append(plain.text)
    assert len(prefixes) > 0


def write_image(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_images_in_a_prefix_are_keyed_by_content(make_checkpoint, tmp_path):
    model, tokenizer = load(make_checkpoint(LAYOUTS["conditional"])[0], dtype="float32")
    first, second = write_image(tmp_path / "a.png", 0), write_image(tmp_path / "b.png", 1)
    prefixes = PrefixCache()

    def ask(image):
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ]

    generate(model, tokenizer, ask(first), max_tokens=4, prompt_cache=prefixes)
    again = generate(model, tokenizer, ask(first), max_tokens=4, prompt_cache=prefixes)
    other = generate(model, tokenizer, ask(second), max_tokens=4, prompt_cache=prefixes)
    fresh = generate(model, tokenizer, ask(second), max_tokens=4)
    image_start = tokenizer.encode(tokenizer.apply_chat_template(ask(first))).index(
        model.config.token_ids["image_token_id"]
    )
    assert again.cached_tokens == again.prompt_tokens - 1
    assert other.cached_tokens <= image_start  # same size, other pixels: not the same prefix
    assert other.text == fresh.text


def test_two_threads_share_one_prefix_cache(tiny):
    model, tokenizer = tiny
    prefixes = PrefixCache()
    base = [{"role": "user", "content": "A long shared question about the sea."}]
    generate(model, tokenizer, base, max_tokens=6, prompt_cache=prefixes)
    follow_ups = [
        base + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": text}]
        for text in ("Fish?", "Whales?")
    ]
    expected = [generate(model, tokenizer, m, max_tokens=8).text for m in follow_ups]
    results = [None, None]

    def run(index):
        results[index] = generate(
            model, tokenizer, follow_ups[index], max_tokens=8, prompt_cache=prefixes
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.text for r in results] == expected
    assert all(r.cached_tokens > 0 for r in results)


def test_the_byte_budget_drops_the_least_recently_used(tiny):
    model, _ = tiny
    one = model.make_cache()
    logits(model, one, [1, 2, 3, 4])
    size = one.snapshot().nbytes
    prefixes = PrefixCache(max_bytes=2 * size + size // 2)
    snapshots = []
    for start in range(3):
        cache = model.make_cache()
        logits(model, cache, [start + 10, 2, 3, 4])
        snapshots.append(cache.snapshot())
        prefixes.insert(snapshots[-1])
    assert len(prefixes) == 2 and prefixes.nbytes <= prefixes.max_bytes
    fingerprint = snapshots[0].fingerprint
    assert prefixes.lookup(fingerprint, [10, 2, 3, 4, 5], limit=4) is None  # dropped first
    assert prefixes.lookup(fingerprint, [12, 2, 3, 4, 5], limit=4) is snapshots[2]


def test_snapshots_are_tied_to_the_weights_not_only_the_config(make_checkpoint):
    same_config = [load(make_checkpoint(Spec(seed=seed))[0])[0] for seed in (0, 1)]
    assert same_config[0].config == same_config[1].config
    cache = same_config[0].make_cache()
    logits(same_config[0], cache, [1, 2, 3])
    with pytest.raises(ValueError, match="taken from another model"):
        same_config[1].make_cache().restore(cache.snapshot())
    again = load(make_checkpoint(Spec(seed=0))[0])[0]  # the same files: the same model
    again.make_cache().restore(cache.snapshot())


def test_a_saved_conversation_loads_and_continues_exactly(tiny, tmp_path):
    model, _ = tiny
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    fresh = logits(model, model.make_cache(), ids)
    cache = model.make_cache()
    logits(model, cache, ids[:7])
    save_prompt_cache(tmp_path / "chat.safetensors", cache)
    loaded = load_prompt_cache(tmp_path / "chat.safetensors", model)
    assert loaded.tokens == ids[:7]
    assert relative_error(logits(model, loaded, ids[7:]), fresh[7:]) <= 1e-5


def test_a_saved_state_from_elsewhere_is_refused(tiny, make_checkpoint, tmp_path):
    model, _ = tiny
    cache = model.make_cache()
    logits(model, cache, [1, 2, 3])
    save_prompt_cache(tmp_path / "state.safetensors", cache)
    other, _ = load(make_checkpoint(Spec(seed=1))[0])
    with pytest.raises(ValueError, match="saved from another model"):
        load_prompt_cache(tmp_path / "state.safetensors", other)
    data = (tmp_path / "state.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read as a prompt cache"):
        load_prompt_cache(tmp_path / "cut.safetensors", model)
    mx.save_safetensors(str(tmp_path / "weights.safetensors"), {"w": mx.zeros(3)})
    with pytest.raises(ValueError, match="is not a qwen35-mlx prompt cache"):
        load_prompt_cache(tmp_path / "weights.safetensors", model)


def test_the_disk_tier_resumes_a_conversation_in_a_later_run(tiny, tmp_path):
    model, tokenizer = tiny
    folder = tmp_path / "prompt-cache"
    first = [{"role": "user", "content": "Read this long document about tides."}]
    reply = generate(
        model, tokenizer, first, max_tokens=6, prompt_cache=PrefixCache(directory=folder)
    )
    files = sorted(folder.glob("*.safetensors"))
    assert files
    follow_up = first + [
        {"role": "assistant", "content": reply.text},
        {"role": "user", "content": "And the moon?"},
    ]
    expected = generate(model, tokenizer, follow_up, max_tokens=6)
    later_run = generate(
        model, tokenizer, follow_up, max_tokens=6, prompt_cache=PrefixCache(directory=folder)
    )  # nothing in memory
    assert later_run.text == expected.text and later_run.cached_tokens > 0
    for file in folder.glob("*.safetensors"):  # every file truncated: skipped and removed
        file.write_bytes(file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipping and removing prompt cache file"):
        again = generate(
            model, tokenizer, follow_up, max_tokens=6, prompt_cache=PrefixCache(directory=folder)
        )
    assert again.text == expected.text and again.cached_tokens == 0


def test_a_folder_that_cannot_be_written_is_skipped(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot be written"):
        prefixes = PrefixCache(directory=tmp_path / "a-file" / "cache")
    result = generate(model, tokenizer, "Hello", max_tokens=3, prompt_cache=prefixes)
    assert result.text == generate(model, tokenizer, "Hello", max_tokens=3).text


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_generation_snapshots_and_files(tiny, tmp_path, bits):
    model, tokenizer = tiny
    kv = {"kv_bits": bits, "kv_group_size": 32, "quantized_kv_start": 8}
    ids = [7, 3, 9, 2, 4, 11, 5, 8, 6, 1, 12, 10, 13, 14]
    fresh = logits(model, model.make_cache(**kv), ids)
    float_logits = logits(model, model.make_cache(), ids)
    # quantized keys and values change the logits a little, never wildly
    assert relative_error(fresh, float_logits) <= (0.05 if bits == 8 else 0.2)
    cache = model.make_cache(**kv)
    logits(model, cache, ids[:10])  # past quantized_kv_start: quantized by the next call
    reference = model.make_cache(**kv)  # the same calls, without saving or restoring
    logits(model, reference, ids[:10])
    fresh = np.concatenate([fresh[:10], logits(model, reference, ids[10:])])
    save_prompt_cache(tmp_path / "q.safetensors", cache)
    loaded = load_prompt_cache(tmp_path / "q.safetensors", model, **kv)
    assert relative_error(logits(model, loaded, ids[10:]), fresh[10:]) <= 1e-5
    restored = model.make_cache(**kv)
    restored.restore(cache.snapshot())
    assert relative_error(logits(model, restored, ids[10:]), fresh[10:]) <= 1e-5
    with pytest.raises(ValueError, match="taken from another model"):
        model.make_cache().restore(cache.snapshot())  # a float cache takes no quantized state
    prefixes = PrefixCache()
    cached = generate(model, tokenizer, "Hello there", max_tokens=4, prompt_cache=prefixes, **kv)
    plain = generate(model, tokenizer, "Hello there", max_tokens=4, **kv)
    assert cached.text == plain.text


def test_a_cache_of_another_model_is_refused(tiny, make_checkpoint):
    model, tokenizer = tiny
    other, _ = load(make_checkpoint(Spec(seed=1))[0])
    cache = other.make_cache()
    logits(other, cache, [1, 2, 3])
    with pytest.raises(ValueError, match="this cache belongs to another model"):
        next(stream_generate(model, tokenizer, [4, 5], cache=cache))
    assert cache.tokens == [1, 2, 3]


def test_cache_and_prompt_cache_together_are_refused(tiny):
    model, tokenizer = tiny
    cache = model.make_cache()
    with pytest.raises(ValueError, match="give cache= .* or prompt_cache= .*not both"):
        next(stream_generate(model, tokenizer, "Hi", cache=cache, prompt_cache=PrefixCache()))
    assert cache.offset == 0


@pytest.mark.parametrize("kwargs", [{"max_bytes": -1}, {"interval": 0}])
def test_bad_prefix_cache_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="max_bytes must be >= 0 and interval >= 1"):
        PrefixCache(**kwargs)
