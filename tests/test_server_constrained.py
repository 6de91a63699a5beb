"""Constrained decoding over HTTP: `response_format` (every reply of a random model validates)
and `tool_choice` naming a function (a real two-step tool loop), on a random model with the
real 248K vocabulary, which the grammar library needs; Anthropic's `tool_choice` too."""

import json

import anthropic
import jsonschema
import openai
import pytest
from test_bench import write_text_only_checkpoint

from qwen35_mlx import generate, load

from server_fixtures import API_KEY, MODEL_ID, start_server

HISTORY = [{"role": "user", "content": "Name a person."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = write_text_only_checkpoint(tmp_path_factory.mktemp("served") / "ckpt")
    running, stop = start_server(directory)
    yield running
    stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(served):
    return load(served.directory)


def chat(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return client.chat.completions.create(
        model=MODEL_ID, messages=messages, temperature=0, **kwargs
    )


# bounded values: a random model's free string would run to max_tokens
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_replies_validate(client, seed):
    """The random model is the adversarial case: only the grammar makes its reply JSON."""
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    reply = client.chat.completions.create(
        model=MODEL_ID,
        messages=HISTORY,
        max_tokens=200,
        temperature=1.0,
        seed=seed,
        response_format=response_format,
    ).choices[0]
    assert reply.finish_reason == "stop"  # ended when the value closed
    jsonschema.validate(json.loads(reply.message.content), SCHEMA)


def test_json_object_replies_are_objects(client):
    reply = chat(client, HISTORY, max_tokens=200, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_a_two_step_tool_loop_with_a_named_tool_choice(client, local):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    reply = chat(client, messages, max_tokens=200, tools=[WEATHER], tool_choice=forced)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21C"},
    ]
    final = chat(client, messages, tools=[WEATHER]).choices[0].message.content
    assert final == generate(*local, messages, max_tokens=12, tools=[WEATHER]).text


def test_anthropic_tool_choice_forces_a_tool_use(served):
    client = anthropic.Anthropic(base_url=served.url, api_key=API_KEY, max_retries=0)
    tool = {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": WEATHER["function"]["parameters"],
    }
    message = client.messages.create(
        model=MODEL_ID,
        max_tokens=200,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    uses = [block for block in message.content if block.type == "tool_use"]
    assert [use.name for use in uses] == ["get_weather"]
    jsonschema.validate(uses[0].input, tool["input_schema"])
    assert message.stop_reason == "tool_use"
