"""The qwen35-mlx command: flags reach the API, bad input is a clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from qwen35_mlx import load, stream_generate
from qwen35_mlx.chat import ChatSession
from qwen35_mlx.cli import main
from qwen35_mlx.cli.options import GENERATION_KWARGS, MEDIA_KWARGS

from checkpoints import Spec


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    return make_checkpoint(Spec())[0]


def test_generate_prints_what_the_api_generates(tiny, capsys):
    model, tokenizer = load(tiny)
    messages = [{"role": "user", "content": "Hi there"}]
    expected = "".join(r.text for r in stream_generate(model, tokenizer, messages, max_tokens=12))
    assert (
        main(["generate", "--model", str(tiny), "--prompt", "Hi there", "--max-tokens", "12"]) == 0
    )
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "generation: 12 tokens" in err or "finish: stop" in err


def test_every_generation_flag_maps_to_a_keyword(tiny, monkeypatch):
    seen = {}

    def fake_stream(model, tokenizer, prompt, **kwargs):
        seen.update(kwargs)
        return iter(())

    monkeypatch.setattr("qwen35_mlx.cli.generate.stream_generate", fake_stream)
    main(
        [
            "generate",
            "--model",
            str(tiny),
            "--prompt",
            "x",
            "--no-enable-thinking",
            "--max-tokens",
            "5",
            "--temp",
            "0.7",
            "--top-p",
            "0.8",
            "--top-k",
            "20",
            "--min-p",
            "0.05",
            "--repetition-penalty",
            "1.1",
            "--presence-penalty",
            "1.5",
            "--frequency-penalty",
            "0.2",
            "--seed",
            "3",
            "--prefill-step-size",
            "128",
            "--stop",
            "END",
            "--stop",
            "###",
            "--kv-bits",
            "8",
            "--kv-group-size",
            "32",
            "--quantized-kv-start",
            "16",
            "--mtp",
            "--num-draft-tokens",
            "2",
            "--no-adaptive-drafting",
            "--draft-model",
            str(tiny),
            "--image",
            "a.png",
            "--video",
            "v.mp4",
            "--image",
            "b.png",
            "c.png",
        ]
    )
    draft_model, draft_tokenizer = seen.pop("draft_model")  # loaded, with its tokenizer
    assert draft_model.config.text.vocab_size == 512 and draft_tokenizer.vocabulary()
    assert seen == dict(
        enable_thinking=False,
        max_tokens=5,
        temp=0.7,
        top_p=0.8,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=1.5,
        frequency_penalty=0.2,
        seed=3,
        prefill_step_size=128,
        stop=["END", "###"],
        kv_bits=8,
        kv_group_size=32,
        quantized_kv_start=16,
        mtp=True,
        num_draft_tokens=2,
        adaptive_drafting=False,
        images=["a.png", "b.png", "c.png"],
        videos=["v.mp4"],
    )
    assert set(seen) == set(GENERATION_KWARGS) | set(MEDIA_KWARGS)


def test_chat_answers_each_turn(tiny, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nAgain\n"))
    assert main(["chat", "--model", str(tiny), "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.count(">> ") == 4 and "(new conversation)" in out
    assert err.count("generation: ") == 2


@pytest.fixture(scope="module")
def tiny_vision(make_checkpoint):
    return make_checkpoint(Spec(layout="conditional"))[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (512, 384, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.parametrize("max_pixels", [None, 65536], ids=["default", "max-pixels"])
def test_generate_with_an_image_prints_what_the_api_generates(
    tiny_vision, image, max_pixels, capsys
):
    options = {"max_pixels": max_pixels} if max_pixels else None
    model, tokenizer = load(tiny_vision, processor_options=options)
    responses = list(stream_generate(model, tokenizer, "What is it?", images=[image], max_tokens=6))
    flags = ["--max-pixels", str(max_pixels)] if max_pixels else []
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_vision),
                "--prompt",
                "What is it?",
                "--image",
                image,
                "--max-tokens",
                "6",
                *flags,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out == "".join(r.text for r in responses) + "\n"
    assert f"prompt: {responses[-1].prompt_tokens} tokens" in err


@pytest.mark.parametrize("how", ["flag", "command"])
def test_chat_shows_an_image_with_the_next_message(tiny_vision, image, how, monkeypatch, capsys):
    model, tokenizer = load(tiny_vision)
    expected = "".join(
        r.text
        for r in ChatSession(model, tokenizer, max_tokens=5).send("What is it?", images=[image])
    )
    lines = "What is it?\n" if how == "flag" else f"/image {image}\nWhat is it?\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    flags = ["--image", image] if how == "flag" else []
    assert main(["chat", "--model", str(tiny_vision), "--max-tokens", "5", *flags]) == 0
    out, _ = capsys.readouterr()
    assert "/image PATH" in out and expected + "\n" in out


def test_chat_reports_a_bad_image_and_goes_on(tiny_vision, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.png"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {missing}\nWhat?\nHello\n"))
    assert main(["chat", "--model", str(tiny_vision), "--max-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert f"error: {missing}: no such file" in out
    assert err.count("generation: ") == 1  # "Hello" is answered, without the image


def test_images_need_the_chat_template(tiny_vision, image, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_vision),
                "--prompt",
                "x",
                "--image",
                image,
                "--ignore-chat-template",
            ]
        )
        == 2
    )
    assert "drop --ignore-chat-template" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json not found" in capsys.readouterr().err
