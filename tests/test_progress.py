"""Prefill progress: the callback's counts, the bar's text, and the CLI's bar on stderr."""

import io
import itertools

import mlx.core as mx
import pytest

from qwen35_mlx import load, stream_generate
from qwen35_mlx.cli import main
from qwen35_mlx.generate import generate_step
from qwen35_mlx.loading import load_model
from qwen35_mlx.progress import PrefillBar, progress_kwargs

from checkpoints import Spec


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    return make_checkpoint(Spec())[0]


@pytest.mark.parametrize("length, step", [(23, 5), (21, 5), (2, 5), (1, 4)])
def test_callback_counts_each_prefill_step_up_to_the_prompt_length(tiny, length, step):
    model = load_model(tiny)
    calls = []
    prompt = mx.array(list(range(1, length + 1)))
    tokens = list(
        generate_step(
            prompt,
            model,
            max_tokens=3,
            prefill_step_size=step,
            progress=lambda done, total: calls.append((done, total)),
        )
    )
    assert len(tokens) == 3
    done = [d for d, _ in calls]
    assert {t for _, t in calls} == {length}
    # 0, then one call per prefill step over the first length - 1 tokens, then the last token
    expected = [0, *range(step, length - 1, step)]
    if length > 1 and expected[-1] != length - 1:
        expected.append(length - 1)
    assert done == [*expected, length]
    assert all(b > a for a, b in itertools.pairwise(done))


def test_stream_generate_passes_progress_and_generates_the_same(tiny):
    model, tokenizer = load(tiny)
    prompt = "count " * 30
    plain = [
        r.token
        for r in stream_generate(model, tokenizer, prompt, max_tokens=5, prefill_step_size=8)
    ]
    calls = []
    seen = [
        r.token
        for r in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=5,
            prefill_step_size=8,
            progress=lambda d, t: calls.append((d, t)),
        )
    ]
    assert seen == plain
    total = len(tokenizer.encode(prompt))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls[1:-2]] == list(range(8, total - 1, 8))


def test_bar_text():
    assert PrefillBar.line(4096, 32768, 8.0) == "prefill 4096/32768 tokens 12% 512 tok/s"
    assert PrefillBar.line(0, 100, 0.0) == "prefill 0/100 tokens 0%"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_redraws_one_line_on_a_terminal_and_erases_it_at_the_end():
    out = Terminal()
    times = iter([0.0, 0.0, 1.0, 2.0, 2.5])  # the first call starts the clock
    bar = PrefillBar(100, out, clock=lambda: next(times))
    for done in (0, 100, 200, 250):
        bar(done, 250)
    assert out.getvalue() == (
        "\rprefill 0/250 tokens 0%\rprefill 100/250 tokens 40% 100 tok/s"
        "\rprefill 200/250 tokens 80% 100 tok/s"
        "\rprefill 250/250 tokens 100% 100 tok/s\r\033[K"
    )


def test_bar_writes_lines_elsewhere_and_nothing_for_one_step_prompts():
    out = io.StringIO()
    bar = PrefillBar(100, out, clock=lambda: 1.0)
    bar(0, 100)
    bar(100, 100)
    assert out.getvalue() == ""
    bar(0, 101)
    bar(101, 101)
    assert out.getvalue() == "prefill 0/101 tokens 0%\nprefill 101/101 tokens 100%\n"


def test_bar_shown_on_a_terminal_or_when_asked():
    assert progress_kwargs(None, 8, io.StringIO()) == {}
    assert progress_kwargs(False, 8, Terminal()) == {}
    assert isinstance(progress_kwargs(None, 8, Terminal())["progress"], PrefillBar)
    assert isinstance(progress_kwargs(True, 8, io.StringIO())["progress"], PrefillBar)


def test_cli_prints_the_bar_on_stderr(tiny, capsys):
    _, tokenizer = load(tiny)
    prompt = "word " * 40
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    total = len(tokenizer.encode(text))
    args = [
        "generate",
        "--model",
        str(tiny),
        "--prompt",
        prompt,
        "--max-tokens",
        "2",
        "--prefill-step-size",
        "16",
    ]
    assert main([*args, "--progress"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prefill")]
    assert lines[0] == f"prefill 0/{total} tokens 0%"
    assert lines[1].startswith(f"prefill 16/{total} tokens {100 * 16 // total}% ")
    assert lines[-1].startswith(f"prefill {total}/{total} tokens 100%")
    assert main(args) == 0  # captured stderr is not a terminal: no bar unless asked
    assert "prefill" not in capsys.readouterr().err


def test_chat_cli_prints_the_bar(tiny, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me " * 20 + "\n"))
    assert (
        main(
            [
                "chat",
                "--model",
                str(tiny),
                "--max-tokens",
                "2",
                "--prefill-step-size",
                "8",
                "--progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "prefill 0/" in err and "prefill 8/" in err and " 100%" in err
