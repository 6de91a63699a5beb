"""Careless and hostile inputs to generation: each is a clear error raised before any work,
and the cache is left as it was. Stop strings end the answer where they first appear."""

import math
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx import generate, load, stream_generate
from qwen35_mlx.chat import ChatSession
from qwen35_mlx.cli import main
from qwen35_mlx.generate import ContextLengthError

from checkpoints import Spec

VOCAB = 512  # the tiny checkpoints' vocab_size


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    directory, _ = make_checkpoint(Spec(max_position_embeddings=64))
    return (directory, *load(directory))


@pytest.mark.parametrize("bad", [VOCAB, 600, 10**6, -1])
def test_token_ids_outside_the_vocabulary_are_refused(tiny, bad):
    _, model, tokenizer = tiny
    cache = model.make_cache()
    with pytest.raises(
        ValueError,
        match=f"token id {bad} at position 2 is outside the model's "
        rf"vocabulary \[0, {VOCAB}\)",
    ):
        next(stream_generate(model, tokenizer, [1, 2, bad], cache=cache))
    assert all(not c.state for c in cache)  # nothing ran
    with pytest.raises(ValueError, match=f"token id {bad} at position 1 is outside"):
        model(mx.array([[3, bad]]))
    with pytest.raises(ValueError, match=f"token id {bad} at position 0 is outside"):
        model.embed_inputs(mx.array([[bad]]))


@pytest.mark.parametrize(
    "prompt",
    [
        None,
        3.5,
        [1.5, 2.0],
        [[1, 2]],
        {"role": "user"},
        [True, False],
        b"bytes",
        np.zeros((2, 2), np.int32),
    ],
)
def test_prompts_of_the_wrong_type_are_refused(tiny, prompt):
    _, model, tokenizer = tiny
    with pytest.raises(
        ValueError, match="a prompt is text, a list of token ids or a list of chat messages"
    ):
        next(stream_generate(model, tokenizer, prompt))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temp": -1.0}, "temp"),
        ({"temp": math.nan}, "temp"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"prefill_step_size": 0}, "prefill_step_size"),
    ],
)
def test_bad_generation_arguments_are_named_before_any_work(tiny, kwargs, name):
    _, model, tokenizer = tiny
    cache = model.make_cache()
    with pytest.raises(ValueError, match=f"^{name} must be"):
        next(stream_generate(model, tokenizer, [1, 2, 3], cache=cache, **kwargs))
    assert all(not c.state for c in cache)


def test_a_prompt_that_fills_the_context_exactly_says_so(tiny):
    _, model, tokenizer = tiny
    with pytest.raises(
        ContextLengthError,
        match="fills the model's context window of 64 exactly, leaving no room for a reply",
    ):
        next(stream_generate(model, tokenizer, list(range(64))))
    assert list(stream_generate(model, tokenizer, list(range(64)), max_tokens=0)) == []
    assert len(list(stream_generate(model, tokenizer, list(range(63)), max_tokens=5))) == 1


def test_stop_strings_end_the_answer_where_they_first_appear(tiny):
    _, model, tokenizer = tiny
    full = generate(model, tokenizer, "Tell me", max_tokens=40)
    assert len(full.text) > 12, "the tiny model's greedy text is too short to cut"
    stop = full.text[6:9]
    cut = full.text[: full.text.find(stop)]
    streamed = list(
        stream_generate(model, tokenizer, "Tell me", max_tokens=40, stop=["never there", stop])
    )
    assert "".join(r.text for r in streamed) == cut
    assert streamed[-1].finish_reason == "stop"
    assert generate(model, tokenizer, "Tell me", max_tokens=40, stop=stop).text == cut
    unmatched = generate(model, tokenizer, "Tell me", max_tokens=40, stop="never there")
    assert unmatched.text == full.text and unmatched.finish_reason == full.finish_reason


def test_cli_stop_flag_cuts_like_the_api(tiny, capsys):
    directory, model, tokenizer = tiny
    messages = [{"role": "user", "content": "Tell me"}]
    full = generate(model, tokenizer, messages, max_tokens=30).text
    stop = full[4:7]
    assert (
        main(
            [
                "generate",
                "--model",
                str(directory),
                "--prompt",
                "Tell me",
                "--max-tokens",
                "30",
                "--stop",
                stop,
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == full[: full.find(stop)] + "\n"


def test_a_reply_closed_early_still_ends_the_turn(tiny):
    _, model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_tokens=20)
    replies = session.send("Hello")
    partial = "".join(next(replies).text for _ in range(3))
    replies.close()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[-1]["content"] == partial
    assert len(list(session.send("Again"))) >= 1  # the conversation goes on
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2


def run_chat(directory, monkeypatch, capsys, interrupts: int):
    """The chat CLI on two messages; `interrupts` SIGINTs arrive as the first reply's third
    response is printed."""
    lines = iter(["Hello", "Again"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    real_send = ChatSession.send
    sessions = []

    def send(self, *args, **kwargs):
        sessions.append(self)
        inner = real_send(self, *args, **kwargs)
        try:
            for n, response in enumerate(inner):
                if len(sessions) == 1 and n == 2:
                    for _ in range(interrupts):
                        signal.raise_signal(signal.SIGINT)
                yield response
        finally:
            inner.close()

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(ChatSession, "send", send)
    code = main(["chat", "--model", str(directory), "--max-tokens", "12"])
    return code, capsys.readouterr().out, sessions


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(tiny, monkeypatch, capsys):
    directory, *_ = tiny
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN in a process started in the background
    code, out, sessions = run_chat(directory, monkeypatch, capsys, interrupts=1)
    assert code == 0 and "[stopped]" in out and "Traceback" not in out
    roles = [m["role"] for m in sessions[0].messages]
    assert roles == ["user", "assistant", "user", "assistant"]  # the second message answered
    assert signal.getsignal(signal.SIGINT) is handler  # put back


def test_a_second_ctrl_c_quits_cleanly(tiny, monkeypatch, capsys):
    directory, *_ = tiny
    code, out, sessions = run_chat(directory, monkeypatch, capsys, interrupts=2)
    assert code == 0 and out.rstrip().endswith("(bye)")
    assert len(sessions) == 1  # quit before the second message


def test_help_speaks_to_users(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "add_args" not in out and "module" not in out
    assert "examples:" in out and "qwen35-mlx generate --model" in out


def test_transformers_is_never_imported_at_run_time(tiny):
    directory, *_ = tiny
    script = (
        "import sys, qwen35_mlx, qwen35_mlx.cli\n"
        f"model, tokenizer = qwen35_mlx.load({str(directory)!r})\n"
        "qwen35_mlx.generate(model, tokenizer, 'Hi', max_tokens=2)\n"
        "print(sorted(m for m in ('transformers', 'torch', 'mlx_lm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_request_that_cannot_fit_is_refused_before_any_work(tiny, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr("qwen35_mlx.plan.machine_memory", lambda: (200_000, "RAM"))  # 0.2 MB
    cache = model.make_cache()
    with pytest.raises(ValueError, match="this machine has .*would fit"):
        next(stream_generate(model, tokenizer, list(range(30)), cache=cache, max_tokens=10))
    assert all(not c.state for c in cache)
