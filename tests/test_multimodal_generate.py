"""Generation with images and videos: greedy parity with transformers on the same processed
inputs, chat turns that keep images in the cache, the feature cache, the two prompt forms."""

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35_mlx import VisionCache, load, stream_generate
from qwen35_mlx.chat import ChatSession
from qwen35_mlx.generate import ContextLengthError
from qwen35_mlx.prompt import prepare_prompt

from checkpoints import VISION_IDS, Spec
from metrics import relative_error

IMAGE_ID, VIDEO_ID = VISION_IDS["image_token_id"], VISION_IDS["video_token_id"]


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    directory, reference = make_checkpoint(Spec(layout="conditional"))
    model, tokenizer = load(directory)
    return reference, model, tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two small PNGs of different sizes and a 4-frame GIF at 2 frames per second."""
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (height, width) in {"square": (64, 64), "wide": (48, 80)}.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[name])
    frames = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    paths["gif"] = folder / "clip.gif"
    frames[0].save(paths["gif"], save_all=True, append_images=frames[1:], duration=500, loop=0)
    return paths


def reference_greedy(reference, ids, max_new_tokens, stop_ids, images=None, videos=()):
    """transformers' greedy tokens after `ids` and their log-probabilities [n, vocab], given
    the processor's outputs."""
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE_ID).long() + 2 * (input_ids == VIDEO_ID).long()
    inputs = {}
    if images is not None:
        inputs.update(
            pixel_values=torch.from_numpy(images.pixel_values),
            image_grid_thw=torch.from_numpy(images.grid_thw),
        )
    if videos:
        inputs.update(
            pixel_values_videos=torch.from_numpy(np.concatenate([v.pixel_values for v in videos])),
            video_grid_thw=torch.from_numpy(np.concatenate([v.grid_thw for v in videos])),
        )
    reference.generation_config.eos_token_id = stop_ids
    with torch.no_grad():
        out = reference.generate(
            input_ids,
            mm_token_type_ids=types,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **inputs,
        )
    logprobs = torch.log_softmax(torch.cat(out.logits), dim=-1).numpy()
    return out.sequences[0, len(ids) :].tolist(), logprobs


def assert_same_generation(responses, expected):
    """Greedy tokens equal, and every step's log-probabilities within float32 error."""
    tokens, logprobs = expected
    assert [r.token for r in responses] == tokens
    ours = np.stack([np.array(r.logprobs) for r in responses])
    assert relative_error(ours, logprobs) < 1e-4


def ask(text, images=(), videos=()):
    items = [{"type": "image", "image": str(image)} for image in images] + [
        {"type": "video", "video": str(video)} for video in videos
    ]
    return [{"role": "user", "content": [*items, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("prefill_step_size", [2048, 10], ids=["one-pass", "chunks-of-10"])
def test_two_images_greedy_matches_transformers(tiny, files, prefill_step_size):
    reference, model, tokenizer = tiny
    messages = ask("Compare them.", images=[files["square"], files["wide"]])
    ids = prepare_prompt(model, tokenizer, messages).ids
    stop_ids = sorted(tokenizer.eos_token_ids)
    images = tokenizer.processor.images([files["square"], files["wide"]])
    expected = reference_greedy(reference, ids, 24, stop_ids, images=images)
    assert_same_generation(
        list(
            stream_generate(
                model, tokenizer, messages, max_tokens=24, prefill_step_size=prefill_step_size
            )
        ),
        expected,
    )
    assert ids.count(IMAGE_ID) == int(images.grid_thw.prod(axis=1).sum()) // 4


def test_video_greedy_matches_transformers(tiny, files):
    reference, model, tokenizer = tiny
    messages = ask("What happens?", videos=[files["gif"]])
    ids = prepare_prompt(model, tokenizer, messages).ids
    video = tokenizer.processor.video(files["gif"])
    assert len(video.timestamps) == 2 and ids.count(VIDEO_ID) == 2 * 4  # 2 groups of 2x2
    expected = reference_greedy(reference, ids, 24, sorted(tokenizer.eos_token_ids), videos=[video])
    assert_same_generation(
        list(stream_generate(model, tokenizer, messages, max_tokens=24)), expected
    )


class CountingTower:
    """Wraps a model and counts the vision tower's runs."""

    def __init__(self, model):
        self.model, self.runs = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def encode_vision(self, pixel_values, grid_thw):
        self.runs += 1
        return self.model.encode_vision(pixel_values, grid_thw)


def turn(session, content, **media):
    """(the ids of the conversation as rendered for the reply, the reply's responses)."""
    responses = list(session.send(content, **media))
    ids = prepare_prompt(
        session.model, session.tokenizer, session.messages[:-1], vision_cache=session.vision_cache
    ).ids
    return ids, responses


def test_chat_about_one_image_encodes_it_once_and_matches_a_fresh_run(tiny, files):
    reference, model, tokenizer = tiny
    counting = CountingTower(model)
    session = ChatSession(counting, tokenizer, max_tokens=8)
    turn(session, "What is this?", images=[files["square"]])
    second = turn(session, "Say more.")
    third = turn(
        session,
        [{"type": "image", "image": str(files["square"])}, {"type": "text", "text": "Again?"}],
    )
    assert counting.runs == 1  # the tower ran once: later turns read it from the LRU

    image = tokenizer.processor.images([files["square"]])
    # transformers over the whole conversation as the chat template renders it
    stop_ids = sorted(tokenizer.eos_token_ids)
    twice = tokenizer.processor.images([files["square"]] * 2)
    assert_same_generation(
        second[1], reference_greedy(reference, second[0], 8, stop_ids, images=image)
    )
    assert_same_generation(
        third[1], reference_greedy(reference, third[0], 8, stop_ids, images=twice)
    )


def test_content_list_image_url_and_simple_form_agree(tiny, files):
    _, model, tokenizer = tiny
    data_url = "data:image/png;base64," + base64.b64encode(files["wide"].read_bytes()).decode()
    content_list = ask("Describe.", images=[files["wide"]])
    image_url = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": "Describe."},
            ],
        }
    ]
    pil = Image.open(files["wide"])

    def tokens(prompt, **media):
        return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=10, **media)]

    expected = tokens(content_list)
    assert tokens("Describe.", images=[files["wide"]]) == expected
    assert tokens("Describe.", images=pil) == expected
    assert tokens(image_url) == expected
    assert (
        tokens([{"role": "user", "content": "Describe."}], images=[str(files["wide"])]) == expected
    )
    assert (
        prepare_prompt(model, tokenizer, "Describe.", images=[files["wide"]]).ids
        == prepare_prompt(model, tokenizer, content_list).ids
    )


def test_vision_cache_keeps_features_between_calls(tiny, files):
    _, model, tokenizer = tiny
    counting = CountingTower(model)
    cache = VisionCache(max_entries=1)
    for image in ("square", "square", "wide", "square"):
        list(
            stream_generate(
                counting, tokenizer, "Hi", images=[files[image]], max_tokens=1, vision_cache=cache
            )
        )
    assert counting.runs == 3 and len(cache) == 1  # the second "square" hit; one entry kept


def test_context_check_counts_the_image_tokens(make_checkpoint, files):
    model, tokenizer = load(
        make_checkpoint(Spec(layout="conditional", max_position_embeddings=64))[0]
    )
    text_only = len(prepare_prompt(model, tokenizer, "Hi", images=[]).ids)
    with_image = len(prepare_prompt(model, tokenizer, "Hi", images=[files["wide"]]).ids)
    assert text_only < 64 < with_image
    with pytest.raises(ContextLengthError, match=f"prompt has {with_image} tokens"):
        next(stream_generate(model, tokenizer, "Hi", images=[files["wide"]]))


def test_text_only_checkpoint_refuses_images(make_checkpoint, files):
    model, tokenizer = load(make_checkpoint(Spec())[0])
    with pytest.raises(ValueError, match="text-only.*multimodal"):
        next(stream_generate(model, tokenizer, "What is this?", images=[files["square"]]))


@pytest.mark.parametrize(
    "source, problem",
    [
        ("https://example.com/cat.png", "web URLs are not fetched"),
        ("missing.png", "no such file"),
    ],
    ids=["web-url", "missing-file"],
)
def test_bad_image_sources_are_clear_errors(tiny, source, problem):
    _, model, tokenizer = tiny
    with pytest.raises(ValueError, match=problem):
        next(stream_generate(model, tokenizer, ask("What?", images=[source])))


def test_token_ids_cannot_take_images(tiny, files):
    _, model, tokenizer = tiny
    with pytest.raises(ValueError, match="token ids cannot say where"):
        next(stream_generate(model, tokenizer, [1, 2, 3], images=[files["square"]]))


def test_a_video_items_fps_sets_the_frame_timestamps(tiny, tmp_path):
    _, model, tokenizer = tiny
    for index in range(5):
        Image.fromarray(np.full((64, 64, 3), 40 * index, np.uint8)).save(tmp_path / f"{index}.png")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(tmp_path), "fps": 1},
                {"type": "text", "text": "Go"},
            ],
        }
    ]
    text = tokenizer.decode(prepare_prompt(model, tokenizer, messages).ids)
    # 5 frames at 1 fps: groups of 2 centred at 0.5 s and 2.5 s, the last frame (4 s) padded
    assert [t for t in ("<0.5 seconds>", "<2.5 seconds>", "<4.0 seconds>") if t in text] == [
        "<0.5 seconds>",
        "<2.5 seconds>",
        "<4.0 seconds>",
    ]
    default = tokenizer.decode(
        prepare_prompt(
            model,
            tokenizer,
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": str(tmp_path)},
                        {"type": "text", "text": "Go"},
                    ],
                }
            ],
        ).ids
    )
    assert "<0.2 seconds>" in default  # the sampling rate, 2 fps: (0 + 0.5) / 2 = 0.25
