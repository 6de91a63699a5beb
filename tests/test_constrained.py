"""Constrained decoding (docs/ARCHITECTURE.md §14): a random-weight model with the real 248K
tokenizer, sampling, must still reply with JSON that `jsonschema` validates, or tool calls of
the given tools, ending right after the value."""

import json
import sys

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from test_bench import write_text_only_checkpoint

from qwen35_mlx import generate_step, load, stream_generate
from qwen35_mlx.constrained import json_schema_grammar, response_format_grammar, tool_call_grammar
from qwen35_mlx.tool_calls import parse_tool_calls

MESSAGES = [{"role": "user", "content": "Reply in JSON."}]
JSON_OBJECT = {"type": "json_object"}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 3},
            "minItems": 1,
            "maxItems": 3,
        },
        "home": {
            "type": "object",
            "properties": {"zip": {"type": "integer", "minimum": 1000, "maximum": 9999}},
            "required": ["zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested-object": PERSON,
    "array-of-bounded-integers": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 2,
        "maxItems": 4,
    },
    "enum-or-boolean": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
        "required": ["ok", "size"],
        "additionalProperties": False,
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "units": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city", "days"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "terms": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 99},
                    "minItems": 2,
                    "maxItems": 3,
                }
            },
            "required": ["terms"],
        },
    },
}
TOOLS = [WEATHER, ADD]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer, 64-wide random model with the real vocabulary (248,320) and tokenizer files."""
    return load(write_text_only_checkpoint(tmp_path_factory.mktemp("constrained") / "ckpt"))


def reply(tiny, max_tokens: int, seed: int, **kwargs):
    """(answer text, finish reason, last token) of a sampled reply."""
    model, tokenizer = tiny
    responses = list(
        stream_generate(
            model, tokenizer, MESSAGES, max_tokens=max_tokens, temp=1.0, seed=seed, **kwargs
        )
    )
    text = "".join(r.text for r in responses if not r.reasoning)
    return text, responses[-1].finish_reason, responses[-1].token


def im_end(tokenizer) -> int:
    (token,) = tokenizer.encode("<|im_end|>")
    return token


@pytest.mark.parametrize("seed", range(4))
def test_json_object_replies_are_objects_or_cut_by_max_tokens(tiny, seed):
    """Any JSON object. A random model over 248K tokens rarely closes a string or a number
    (few tokens end one), so a reply may run to max_tokens: it is then cut where it stands,
    with finish_reason "length"."""
    text, finish, last = reply(tiny, 48, seed, response_format=JSON_OBJECT)
    if finish == "stop":
        assert last == im_end(tiny[1])
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and text.startswith("{")


def test_some_json_object_replies_close(tiny):
    replies = [reply(tiny, 48, seed, response_format=JSON_OBJECT) for seed in (4, 5)]
    closed = [json.loads(text) for text, finish, _ in replies if finish == "stop"]
    assert closed and all(isinstance(value, dict) for value in closed)


@pytest.mark.parametrize(
    ("name", "seed"), [("nested-object", 0), ("nested-object", 1), *((n, 2) for n in SCHEMAS)]
)
def test_json_schema_replies_validate_and_end_after_the_value(tiny, name, seed):
    schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    text, finish, last = reply(tiny, 160, seed, response_format=response_format)
    assert finish == "stop", text
    assert last == im_end(tiny[1])
    jsonschema.validate(json.loads(text), schema)  # json.loads: nothing after the value


def test_a_value_not_closed_by_max_tokens_ends_with_length(tiny):
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    text, finish, _ = reply(tiny, 6, 0, response_format=response_format)
    assert finish == "length"
    assert text and '{"name":"'.startswith(text)  # cut where the value stood


def test_no_whitespace_outside_strings(tiny):
    """Where the library's default allows blanks (after `{`), the compact grammar refuses
    them: a random model cannot pad the reply until max_tokens."""
    model, tokenizer = tiny
    vocab = model.config.text.vocab_size
    processor = json_schema_grammar({"type": "object"}).processor(tokenizer, vocab)
    logits = processor(tokenizer.encode("{"), mx.zeros((1, vocab)))
    allowed = np.flatnonzero(np.array(logits[0]) == 0)
    assert {tokenizer.decode([t])[0] for t in allowed} == {'"', "}"}  # no blank starts one


def parse_calls(text: str) -> list[tuple[str, dict]]:
    """(name, arguments) of a reply made only of tool calls, read by the tool-call parser,
    arguments typed by its schema and validated."""
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and calls, text
    for call in calls:
        assert not call.problems, call.problems
        schema = next(t["function"] for t in TOOLS if t["function"]["name"] == call.name)
        jsonschema.validate(call.arguments, schema["parameters"])
    return [(call.name, call.arguments) for call in calls]


@pytest.mark.parametrize("seed", range(3))
def test_tool_choice_required_replies_are_tool_calls(tiny, seed):
    text, finish, last = reply(
        tiny, 200, seed, constraint=tool_call_grammar(TOOLS, "required"), enable_thinking=False
    )
    assert finish == "stop" and last == im_end(tiny[1]), text
    assert {name for name, _ in parse_calls(text)} <= {"get_weather", "add"}


@pytest.mark.parametrize("seed", range(2))
def test_named_tool_choice_calls_exactly_that_function(tiny, seed):
    choice = {"type": "function", "function": {"name": "add"}}
    text, finish, _ = reply(tiny, 120, seed, constraint=tool_call_grammar(TOOLS, choice))
    assert finish == "stop", text
    [(name, _)] = parse_calls(text)
    assert name == "add"


def test_thinking_is_free_then_the_answer_is_constrained(tiny):
    """The reply starts inside <think>: the processor leaves it alone (save refusing the end of
    turn) until </think>, forced here after 5 free tokens, then applies the schema."""
    model, tokenizer = tiny
    vocab = model.config.text.vocab_size
    schema = SCHEMAS["enum-or-boolean"]
    (think_end,) = tokenizer.encode("</think>")
    prompt = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, enable_thinking=True))
    assert tokenizer.decode(prompt).endswith("<think>\n")

    def close_thinking_at_5(generated, logits):
        if len(generated) != 5:
            return logits
        return mx.where(mx.arange(vocab) == think_end, logits, -mx.inf)

    constrained = json_schema_grammar(schema).processor(tokenizer, vocab, thinking=True)
    mx.random.seed(3)
    tokens = [
        token
        for token, _ in generate_step(
            mx.array(prompt),
            model,
            max_tokens=80,
            sampler=lambda logprobs: mx.random.categorical(logprobs),
            logits_processors=[close_thinking_at_5, constrained],
        )
    ]
    end = tokens.index(im_end(tokenizer))  # generate_step goes on; stream_generate stops here
    assert tokens[5] == think_end, tokens
    assert not tokenizer.decode(tokens[:5]).startswith("{")  # the reasoning was free
    jsonschema.validate(json.loads(tokenizer.decode(tokens[6:end])), schema)


def test_reasoning_cannot_end_the_turn(tiny):
    model, tokenizer = tiny
    vocab = model.config.text.vocab_size
    processor = json_schema_grammar({"type": "object"}).processor(tokenizer, vocab, thinking=True)
    logits = np.array(processor([], mx.zeros((1, vocab)))[0])
    refused = np.flatnonzero(logits == -np.inf)
    assert set(refused) == set(tokenizer.eos_token_ids)


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "foo"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": "a"}}},
            "minimum",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs"),
        ({"type": "xml"}, "response_format must be"),
    ],
)
def test_invalid_response_formats_are_clear_errors(response_format, message):
    with pytest.raises(ValueError, match=message):
        response_format_grammar(response_format)


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
        ([], "required", "at least one tool"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"required": ["x"]}}}],
            "required",
            r"requires parameters \['x'\]",
        ),
        (TOOLS, "always", "tool_choice must be"),
    ],
)
def test_invalid_tool_choices_are_clear_errors(tools, choice, message):
    with pytest.raises(ValueError, match=message):
        tool_call_grammar(tools, choice)


def test_auto_and_none_are_unconstrained():
    assert tool_call_grammar(TOOLS, "auto") is None and tool_call_grammar(TOOLS, "none") is None
    assert response_format_grammar({"type": "text"}) is None


def test_constraints_do_not_combine_with_speculation(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="speculative"):
        next(stream_generate(model, tokenizer, "x", mtp=True, response_format=JSON_OBJECT))


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ImportError, match=r"qwen35-mlx\[server\]"):
        response_format_grammar(JSON_OBJECT)
