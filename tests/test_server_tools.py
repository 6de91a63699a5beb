"""Tool calls over HTTP: a reply holding Qwen3.5's XML call markup reaches the official
clients as OpenAI `tool_calls` (whole and as streamed deltas) and Anthropic `tool_use` blocks,
and the next request carries the result back. A random model never writes a call unprompted, so
the engine here is an autospec of the real `Engine` replaying a scripted reply token by token
(the HTTP side is the real server); the real model's tool rendering is tested in
test_server_anthropic.py and tests/test_tool_calls.py."""

import asyncio
import json
from unittest.mock import create_autospec

import anthropic
import openai
import pytest

from qwen35_mlx.server.engine import Engine, Event, Handle, Usage

from server_fixtures import API_KEY, MODEL_ID, start_server

CALL = (
    "Let me look.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
    "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]


def scripted_engine(replies: list[str]):
    """An Engine autospec whose requests get `replies` in turn, a few characters per event; the
    requests it got are in `engine.requests`."""
    engine = create_autospec(Engine, instance=True)
    engine.requests = []

    def submit(request):
        handle = Handle(asyncio.get_running_loop())
        text = replies[len(engine.requests) % len(replies)]
        engine.requests.append(request)
        pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        for n, piece in enumerate(pieces, start=1):
            usage = Usage(prompt_tokens=30, completion_tokens=n, cached_tokens=0)
            finish = "stop" if n == len(pieces) else None
            handle.put(Event(piece, False, token=n, usage=usage, finish_reason=finish))
        handle.close()
        return handle

    engine.submit.side_effect = submit
    return engine


@pytest.fixture(scope="module")
def served():
    engine = scripted_engine([CALL, "It is sunny."])
    running, stop = start_server(None, engine=engine)
    yield running
    stop()


def test_a_two_step_openai_tool_loop(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # typed
    assert served.engine.requests[-1].tools == TOOLS
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21C"},
    ]
    final = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS)
    assert final.choices[0].message.content == "It is sunny."
    sent = served.engine.requests[-1].prompt
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21C"}


def test_streamed_tool_call_deltas_add_up(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0)
    served.engine.requests.clear()  # the scripted call comes next
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=TOOLS,
            stream=True,
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me look."
    assert calls[0].id and calls[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in calls)
    assert json.loads(arguments) == {"city": "Paris", "days": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_markup_stays_text(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0)
    served.engine.requests.clear()
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Weather?"}]
    )
    assert reply.choices[0].message.content == CALL
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_tool_use_block(served, stream):
    client = anthropic.Anthropic(base_url=served.url, api_key=API_KEY, max_retries=0)
    served.engine.requests.clear()
    tool = {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": TOOLS[0]["function"]["parameters"],
    }
    kwargs = {
        "model": MODEL_ID,
        "max_tokens": 64,
        "tools": [tool],
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    if stream:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Let me look."
    use = message.content[1]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris", "days": 3})
    assert message.stop_reason == "tool_use"
    assert served.engine.requests[-1].tools == [TOOLS[0]]
