"""The Anthropic route driven by the official `anthropic` client against the real server on
loopback; replies checked against the Python API given the same conversation."""

import anthropic
import pytest

from qwen35_mlx import generate, load

from checkpoints import Spec
from server_fixtures import API_KEY, MODEL_ID, png_data_url, start_server

SYSTEM = "You are terse."
QUESTION = [{"role": "user", "content": "Name a colour of the sea."}]
AS_OPENAI = [{"role": "system", "content": SYSTEM}, *QUESTION]


@pytest.fixture(scope="module")
def served(make_checkpoint):
    directory, _ = make_checkpoint(Spec(layout="conditional"))
    running, stop = start_server(directory)
    yield running
    stop()


@pytest.fixture(scope="module")
def client(served):
    return anthropic.Anthropic(base_url=served.url, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(served):
    return load(served.directory)


GREEDY = {"temperature": 0}  # this client has no temperature argument: sent as an extra


def ask(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return client.messages.create(
        model=MODEL_ID, system=SYSTEM, messages=messages, extra_body=GREEDY, **kwargs
    )


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_message_equals_the_python_api(client, local):
    expected = generate(*local, AS_OPENAI, max_tokens=12)
    message = ask(client, QUESTION)
    assert text_of(message) == expected.text
    assert (
        message.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[expected.finish_reason]
    )
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == expected.prompt_tokens
    assert usage.output_tokens == expected.generation_tokens


def test_streamed_events_build_the_same_message(client):
    whole = ask(client, QUESTION)
    kwargs = {"model": MODEL_ID, "system": SYSTEM, "messages": QUESTION, "max_tokens": 12}
    with client.messages.stream(extra_body=GREEDY, **kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert text_of(final) == text_of(whole)
    assert final.stop_reason == whole.stop_reason
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    blocks = kinds[1:-2]
    assert blocks[0] == "content_block_start" and blocks[-1] == "content_block_stop"


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_comes_as_a_thinking_block(client, local, stream):
    expected = generate(*local, AS_OPENAI, max_tokens=16, enable_thinking=True)
    assert expected.reasoning
    kwargs = {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 16}
    if stream:
        with client.messages.stream(
            model=MODEL_ID, system=SYSTEM, messages=QUESTION, extra_body=GREEDY, **kwargs
        ) as events:
            message = events.get_final_message()
    else:
        message = ask(client, QUESTION, **kwargs)
    thinking = [block.thinking for block in message.content if block.type == "thinking"]
    assert "".join(thinking).strip() == expected.reasoning
    assert text_of(message) == expected.text
    assert message.content[0].type == "thinking"


def test_disabled_thinking_gives_no_thinking_block(client, local):
    expected = generate(*local, AS_OPENAI, max_tokens=12, enable_thinking=False)
    message = ask(client, QUESTION, thinking={"type": "disabled"})
    assert all(block.type == "text" for block in message.content)
    assert text_of(message) == expected.text


def test_a_stop_sequence_is_reported(client, local):
    full = generate(*local, AS_OPENAI, max_tokens=12).text
    stop = full[4:7]
    message = ask(client, QUESTION, stop_sequences=["never there", stop])
    assert text_of(message) == full[: full.index(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)


def test_a_base64_image_is_seen(client, local):
    url = png_data_url(color=(30, 160, 40))
    data = url.split(",", 1)[1]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
    as_openai = [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is this?"},
            ],
        },
    ]
    assert text_of(ask(client, messages)) == generate(*local, as_openai, max_tokens=12).text


def test_tool_use_and_result_are_rendered_as_the_python_api_renders_them(client, local):
    tool = {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should look.", "signature": ""},
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny, 21C"}],
        },
    ]
    as_openai = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"},
    ]
    openai_tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": tool["input_schema"],
            },
        }
    ]
    expected = generate(*local, as_openai, max_tokens=12, tools=openai_tools)
    message = ask(client, messages, tools=[tool])
    assert text_of(message) == expected.text
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == (
        expected.prompt_tokens
    )
