"""The qwen35-mlx command: flags reach the API, bad input is a clear error."""

import io

import pytest

from checkpoints import Spec
from qwen35_mlx import load, stream_generate
from qwen35_mlx.cli import main
from qwen35_mlx.cli.options import GENERATION_KWARGS


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    return make_checkpoint(Spec())[0]


def test_generate_prints_what_the_api_generates(tiny, capsys):
    model, tokenizer = load(tiny)
    messages = [{"role": "user", "content": "Hi there"}]
    expected = "".join(r.text for r in stream_generate(model, tokenizer, messages, max_tokens=12))
    assert main(["generate", "--model", str(tiny), "--prompt", "Hi there", "--max-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "generation: 12 tokens" in err or "finish: stop" in err


def test_every_generation_flag_maps_to_a_keyword(tiny, monkeypatch):
    seen = {}

    def fake_stream(model, tokenizer, prompt, **kwargs):
        seen.update(kwargs)
        return iter(())

    monkeypatch.setattr("qwen35_mlx.cli.generate.stream_generate", fake_stream)
    main(["generate", "--model", str(tiny), "--prompt", "x", "--no-enable-thinking",
          "--max-tokens", "5", "--temp", "0.7", "--top-p", "0.8", "--top-k", "20",
          "--min-p", "0.05", "--repetition-penalty", "1.1", "--presence-penalty", "1.5",
          "--frequency-penalty", "0.2", "--seed", "3", "--prefill-step-size", "128"])
    assert seen == dict(enable_thinking=False, max_tokens=5, temp=0.7, top_p=0.8, top_k=20,
                        min_p=0.05, repetition_penalty=1.1, presence_penalty=1.5,
                        frequency_penalty=0.2, seed=3, prefill_step_size=128)
    assert set(seen) == set(GENERATION_KWARGS)


def test_chat_answers_each_turn(tiny, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nAgain\n"))
    assert main(["chat", "--model", str(tiny), "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.count(">> ") == 4 and "(new conversation)" in out
    assert err.count("generation: ") == 2


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json not found" in capsys.readouterr().err
