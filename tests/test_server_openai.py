"""The OpenAI routes driven by the official `openai` client against the real server on loopback;
replies checked against the Python API and log-probabilities against transformers."""

import json
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

from qwen35_mlx import generate, load, stream_generate

from checkpoints import Spec
from server_fixtures import API_KEY, MODEL_ID, png_data_url, start_server

README = Path(__file__).parent.parent / "README.md"
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour of the sea."},
]


@pytest.fixture(scope="module")
def served(make_checkpoint):
    directory, reference = make_checkpoint(Spec(layout="conditional"))
    running, stop = start_server(directory)
    yield running, reference
    stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(served):
    """The same checkpoint through the Python API."""
    return load(served[0].directory)


def chat(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return client.chat.completions.create(
        model=MODEL_ID, messages=messages, temperature=0, **kwargs
    )


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL_ID]


def test_chat_reply_equals_the_python_api(client, local):
    expected = generate(*local, HISTORY, max_tokens=12)
    reply = chat(client, HISTORY)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.generation_tokens


def test_a_developer_message_is_a_system_message(client):
    as_developer = [{**HISTORY[0], "role": "developer"}, *HISTORY[1:]]
    expected = chat(client, HISTORY).choices[0].message.content
    assert chat(client, as_developer).choices[0].message.content == expected


def test_streamed_chat_equals_the_whole_reply(client):
    whole = chat(client, HISTORY)
    chunks = list(chat(client, HISTORY, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices  # the usage chunk comes last, with no choices
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("thinking", [True, False])
def test_reasoning_comes_apart_from_the_answer(client, local, thinking):
    expected = generate(*local, HISTORY, max_tokens=16, enable_thinking=thinking)
    extra = {"chat_template_kwargs": {"enable_thinking": thinking}}
    message = chat(client, HISTORY, max_tokens=16, extra_body=extra).choices[0].message
    assert (getattr(message, "reasoning_content", None) or "").strip() == expected.reasoning
    assert message.content == expected.text
    if thinking:
        assert expected.reasoning  # the case shows reasoning at all
    streamed = chat(client, HISTORY, max_tokens=16, extra_body=extra, stream=True)
    parts = {"reasoning_content": "", "content": ""}
    for chunk in streamed:
        delta = chunk.choices[0].delta
        for key in parts:
            parts[key] += getattr(delta, key, None) or ""
    assert parts["reasoning_content"].strip() == expected.reasoning
    assert parts["content"] == expected.text


def test_a_stop_string_ends_the_answer(client, local):
    full = generate(*local, HISTORY, max_tokens=12).text
    stop = full[4:7]
    assert stop.strip()
    reply = chat(client, HISTORY, stop=[stop]).choices[0]
    assert reply.message.content == full[: full.index(stop)]
    assert reply.finish_reason == "stop"


def test_logprobs_match_transformers(served, client, local):
    _, reference = served
    _, tokenizer = local
    reply = chat(client, HISTORY, max_tokens=6, logprobs=True, top_logprobs=3).choices[0]
    entries = reply.logprobs.content
    generated = [r.token for r in stream_generate(*local, HISTORY, max_tokens=6)]
    generated = generated[:-1] if reply.finish_reason == "stop" else generated  # the stop token
    assert [e.token for e in entries] == [tokenizer.decode([t]) for t in generated]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(HISTORY))
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + generated])).logits[0].double()
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]  # [steps, vocab]
    for entry, token, row in zip(entries, generated, expected):
        assert entry.logprob == pytest.approx(row[token].item(), abs=2e-3)
        top = torch.topk(row, 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=2e-3
        )
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely


def test_a_resent_history_reports_cached_tokens(client, local):
    history = [{"role": "user", "content": "Count sheep for me, slowly, one by one."}]
    first = chat(client, history)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    answer = first.choices[0].message.content
    history += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Go on."},
    ]
    second = chat(client, history)
    cached = second.usage.prompt_tokens_details.cached_tokens
    _, tokenizer = local
    question = tokenizer.apply_chat_template(history[:1], add_generation_prompt=False)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(h)) for h in (history[:1], history)]
    common = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
    # reused from the snapshot where the assistant turn starts (or a later one), no further
    # than the two renderings agree
    assert len(tokenizer.encode(question)) <= cached <= common
    assert second.choices[0].message.content == generate(*local, history, max_tokens=12).text


def test_an_image_as_data_url_is_seen(client, local):
    def ask(url):
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ]

    red, blue = png_data_url(color=(220, 20, 20)), png_data_url(color=(20, 20, 220))
    reply = chat(client, ask(red))
    assert reply.choices[0].message.content == generate(*local, ask(red), max_tokens=12).text
    assert reply.usage.prompt_tokens > 20  # the image's placeholder tokens are in the prompt
    expected_blue = generate(*local, ask(blue), max_tokens=12).text
    assert chat(client, ask(blue)).choices[0].message.content == expected_blue


def test_sampling_with_a_seed_repeats(client):
    def sample():
        return client.chat.completions.create(
            model=MODEL_ID,
            messages=HISTORY,
            max_completion_tokens=8,
            temperature=1.0,
            top_p=0.9,
            seed=7,
            extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1},
        ).choices[0]

    first, second = sample(), sample()
    assert first.message.content == second.message.content
    assert first.finish_reason in ("stop", "length")


def test_text_completion_equals_the_python_api(client, local):
    prompt = "The sea is"
    expected = generate(*local, prompt, max_tokens=10)
    reply = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected.text
    streamed = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected.text


def test_logprob_tokens_are_the_generated_ids(client, local):
    """/v1/completions' legacy logprobs: one entry per token; greedy picks the most likely (the
    {token: logprob} maps merge ids that decode alike, so only the bound is checked)."""
    reply = client.completions.create(
        model=MODEL_ID, prompt="The sea is", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) >= 1 and all(value <= chosen <= 0 for value in top.values())


def readme_serve_block(language: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Serve") :]
    return re.search(rf"^```{language}\n(.*?)^```", section, re.DOTALL | re.MULTILINE).group(1)


def as_here(code: str, url: str) -> str:
    """The README's example pointed at the test server."""
    code = code.replace("http://127.0.0.1:8080", url).replace("Qwen/Qwen3.5-0.8B", MODEL_ID)
    return code.replace('api_key="unused"', f'api_key="{API_KEY}"')


def test_the_readme_examples_run(served, local):
    running, _ = served
    done = subprocess.run(
        [sys.executable, "-c", as_here(readme_serve_block("python"), running.url)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout  # the streamed answer (sampled: its text is not fixed)
    curl = as_here(readme_serve_block("bash"), running.url)
    curl = curl.replace("curl ", f"curl -s -H 'Authorization: Bearer {API_KEY}' ", 1)
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=300)
    reply = json.loads(done.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
