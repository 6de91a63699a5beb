"""Tool calls (docs/ARCHITECTURE.md §13): the model's XML calls read back with their typed
arguments, streamed as they are read, and tool conversations rendered as transformers renders
them."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen35_mlx import load
from qwen35_mlx.prompt import chat_text, prepare_prompt
from qwen35_mlx.tokenizer import Tokenizer
from qwen35_mlx.tool_calls import (
    TextDelta,
    ToolCallArguments,
    ToolCallEnd,
    ToolCallStart,
    ToolCallStream,
    parse_tool_calls,
    template_messages,
    template_tools,
)

from checkpoints import Spec
from tokenizer_files import write_tokenizer_files

TEMPLATE_VARIANTS = pytest.mark.parametrize(
    "thinking_by_default", [True, False], ids=["4B-9B-template", "0.8B-2B-template"]
)


def function(name, **properties):
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} for tests",
            "parameters": {"type": "object", "properties": properties},
        },
    }


TOOLS = [
    function(
        "edit_file",
        path={"type": "string"},
        text={"type": "string"},
        line={"type": "integer"},
        scale={"type": "number"},
        dry_run={"type": "boolean"},
        options={"type": "object"},
        lines={"type": "array", "items": {"type": "integer"}},
        note={"type": ["string", "null"]},
        count={"anyOf": [{"type": "integer"}, {"type": "string"}]},
        mode={"enum": ["fast", "slow"]},
        extra={},
    ),
    function("get_weather", city={"type": "string"}, days={"type": "integer"}),
]

# arguments of every type, as a caller's history holds them; the template writes them out
TYPED_CALLS = [
    (
        "edit_file",
        {
            "path": "src/main.py",
            "text": "def f(x):\n    return x  # 42\n\n</not-a-tag>\n",
            "line": 12,
            "scale": -2.5,
            "dry_run": True,
            "options": {"indent": 4, "tabs": False, "name": "x\ny"},
            "lines": [3, 1, 2],
            "note": None,
            "count": 7,
            "mode": "fast",
            "extra": {"nested": [1, {"a": None}]},
        },
    ),
    ("get_weather", {"city": "42", "days": 0}),  # a string that looks like a number stays one
    ("edit_file", {"path": "\nleading and trailing newlines\n", "dry_run": False, "text": "null"}),
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """thinking_by_default -> (ours, transformers'), loaded from the same released-format
    files."""
    transformers = pytest.importorskip("transformers")
    loaded = {}
    for thinking_by_default in (True, False):
        directory = tmp_path_factory.mktemp(f"tool_template_{thinking_by_default}")
        write_tokenizer_files(directory, thinking_by_default=thinking_by_default)
        loaded[thinking_by_default] = (
            Tokenizer.from_pretrained(directory),
            transformers.AutoTokenizer.from_pretrained(directory),
        )
    return loaded


def rendered_answer(tokenizer, content, calls):
    """The assistant turn's answer as the released template writes it for `calls`."""
    messages = [
        {"role": "user", "content": "Do it."},
        {
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": arguments}}
                for name, arguments in calls
            ],
        },
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=False)
    turn = text.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    return turn.split("</think>\n\n", 1)[-1]  # the answer, after any reasoning block


@TEMPLATE_VARIANTS
@pytest.mark.parametrize("content", ["", "Let me look at the file first."])
def test_calls_rendered_by_the_template_parse_back(tokenizers, thinking_by_default, content):
    ours, _ = tokenizers[thinking_by_default]
    answer = rendered_answer(ours, content, TYPED_CALLS)
    assert answer.count("<tool_call>") == len(TYPED_CALLS)
    parsed_content, calls = parse_tool_calls(answer, TOOLS)
    assert parsed_content == content
    assert [(call.name, call.arguments) for call in calls] == TYPED_CALLS
    assert [call.problems for call in calls] == [[], [], []]
    assert len({call.id for call in calls}) == len(calls)
    for call, (_, arguments) in zip(calls, TYPED_CALLS):
        assert json.loads(call.arguments_json) == arguments
        assert type(call.arguments.get("scale", 0.0)) is float


def test_agrees_with_mlx_lm_on_well_formed_calls():
    """mlx-lm's Qwen3-Coder parser (one call's inside) as a peer, on values where the
    documented differences (type lists and anyOf, empty schemas, string "null", literal_eval
    guesses) do not arise."""
    qwen3_coder = pytest.importorskip("mlx_lm.tool_parsers.qwen3_coder")
    calls = list(TYPED_CALLS[:2])
    calls[0] = (
        calls[0][0],
        {k: v for k, v in calls[0][1].items() if k not in ("note", "count", "extra")},
    )
    answer = "".join(
        "<tool_call>\n<function="
        + name
        + ">\n"
        + "".join(
            f"<parameter={key}>\n"
            + (json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value))
            + "\n</parameter>\n"
            for key, value in arguments.items()
        )
        + "</function>\n</tool_call>\n"
        for name, arguments in calls
    )
    _, ours = parse_tool_calls(answer, TOOLS)
    blocks = answer.split("<tool_call>")[1:]
    theirs = [
        qwen3_coder.parse_tool_call(block.split("</tool_call>")[0], TOOLS) for block in blocks
    ]
    assert [{"name": c.name, "arguments": c.arguments} for c in ours] == theirs


MODEL_OUTPUTS = {
    "reasoning_then_two_calls": (
        "I need the weather in two cities.\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n"
        "</function>\n</tool_call>",
        "I need the weather in two cities.",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "São Paulo"})],
    ),
    "json_values_and_spacing": (
        "<tool_call>\n<function=edit_file>\n<parameter=options>\n"
        '{"indent": 2,\n "list": [1, 2.5, "x"]}\n</parameter>\n'
        "<parameter=lines>\n  [1, 2]  \n</parameter>\n<parameter=scale>\n 1e3 \n</parameter>\n"
        "<parameter=line>\n4.0\n</parameter>\n<parameter=dry_run>\nfalse\n</parameter>\n"
        "<parameter=count>\nmany\n</parameter>\n<parameter=note>\nNULL\n</parameter>\n"
        "<parameter=extra>\nplain words\n</parameter>\n</function>\n</tool_call>",
        "",
        [
            (
                "edit_file",
                {
                    "options": {"indent": 2, "list": [1, 2.5, "x"]},
                    "lines": [1, 2],
                    "scale": 1000.0,
                    "line": 4,
                    "dry_run": False,
                    "count": "many",
                    "note": None,
                    "extra": "plain words",
                },
            )
        ],
    ),
    "multi_line_string_kept_exactly": (
        "<tool_call>\n<function=edit_file>\n<parameter=text>\n\n  indented\n\ttab\n\n"
        "</parameter>\n</function>\n</tool_call>",
        "",
        [("edit_file", {"text": "\n  indented\n\ttab\n"})],
    ),
    "missing_parameter_and_function_ends": (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n<parameter=days>\n2\n"
        "</tool_call>",
        "",
        [("get_weather", {"city": "Oslo", "days": 2})],
    ),
    "no_tool_call": (
        "Just an answer, <b>no</b> calls.\n",
        "Just an answer, <b>no</b> calls.\n",
        [],
    ),
    "unterminated_call_is_text": (
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        [],
    ),
    "json_style_call_is_text": (
        'A <tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
        'A <tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
        [],
    ),
    "nameless_function_is_text_and_later_call_kept": (
        "<tool_call>\n<function=>\n</function>\n</tool_call>\n<tool_call>\n"
        "<function=get_weather>\n</function>\n</tool_call>",
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        [("get_weather", {})],
    ),
    "cut_inside_the_opening_tag": ("Hello <tool_c", "Hello <tool_c", []),
    "text_after_the_calls_kept": (
        "<tool_call>\n<function=get_weather>\n</function>\n</tool_call>\nDone.",
        "Done.",
        [("get_weather", {})],
    ),
}


@pytest.mark.parametrize("output", MODEL_OUTPUTS.values(), ids=MODEL_OUTPUTS.keys())
def test_model_outputs(output):
    text, content, expected = output
    parsed_content, calls = parse_tool_calls(text, TOOLS)
    assert parsed_content == content
    assert [(call.name, call.arguments) for call in calls] == expected
    assert all(call.problems == [] for call in calls)


def test_what_does_not_fit_the_tools_is_kept_as_text_and_noted():
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n"
        "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=book_flight>\n<parameter=seats>\n2\n</parameter>\n"
        "</function>\n</tool_call>\n"
        "<tool_call>\n<function=edit_file>\n<parameter=scale>\nNaN\n</parameter>\n"
        "<parameter=lines>\n[1, 2\n</parameter>\n</function>\n</tool_call>"
    )
    _, calls = parse_tool_calls(text, TOOLS)
    assert [call.arguments for call in calls] == [
        {"days": "three", "unit": "celsius"},
        {"seats": "2"},
        {"scale": "NaN", "lines": "[1, 2"},
    ]
    assert calls[0].problems == [
        "parameter 'days': 'three' is not integer; kept as text",
        "parameter 'unit' is not in 'get_weather''s schema; kept as text",
    ]
    assert calls[1].problems == ["function 'book_flight' is not among the tools offered"]
    assert len(calls[2].problems) == 2
    # without tools every call is unknown and every value text
    _, untyped = parse_tool_calls(text)
    assert untyped[0].arguments == {"days": "three", "unit": "celsius"}


def read_stream(chunks, tools=TOOLS):
    """(content, [(name, arguments)], per-call argument fragments joined, events) of a reply
    fed in `chunks`."""
    stream = ToolCallStream(tools)
    events = [event for chunk in chunks for event in stream.feed(chunk)] + stream.finish()
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = [e.call for e in events if isinstance(e, ToolCallEnd)]
    fragments = {}
    for event in events:
        if isinstance(event, ToolCallArguments):
            fragments[event.index] = fragments.get(event.index, "") + event.delta
    return content, [(c.name, c.arguments) for c in calls], fragments, events


def check_stream(text, chunks):
    content, calls = parse_tool_calls(text, TOOLS)
    streamed_content, streamed_calls, fragments, events = read_stream(chunks)
    assert (streamed_content, streamed_calls) == (content, [(c.name, c.arguments) for c in calls])
    assert fragments == {
        i: json.dumps(c.arguments, ensure_ascii=False) for i, c in enumerate(calls)
    }
    # per call: start (with the name) before its arguments before its end, indices in order
    kinds = [(type(e).__name__, e.index) for e in events if not isinstance(e, TextDelta)]
    assert kinds == [
        (kind, index)
        for index in range(len(calls))
        for kind in ("ToolCallStart", "ToolCallArguments", "ToolCallEnd")
    ]
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert [(s.id, s.name) for s in starts] == [(e.call.id, e.call.name) for e in ends]


STREAM_TEXTS = [text for text, _, _ in MODEL_OUTPUTS.values()]


@pytest.mark.parametrize("text", STREAM_TEXTS, ids=MODEL_OUTPUTS.keys())
def test_stream_split_anywhere_reads_as_the_whole(text):
    check_stream(text, list(text))  # a character at a time
    for cut in range(len(text) + 1):
        check_stream(text, [text[:cut], text[cut:]])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_stream_random_splits(data):
    text = data.draw(st.sampled_from(STREAM_TEXTS))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    check_stream(text, [text[a:b] for a, b in zip(bounds, bounds[1:])])


def test_stream_holds_back_only_what_could_start_a_call():
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Hello <tool") == [TextDelta("Hello")]
    assert stream.feed("box> there  ") == [TextDelta(" <toolbox> there")]
    assert stream.finish() == [TextDelta("  ")]


def tool_loop(arguments):
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris for 2 days?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear", "high": 21}'},
        {"role": "assistant", "content": "Clear, 21 °C."},
        {"role": "user", "content": "And tomorrow?"},
    ]


def parallel_calls(arguments):
    """Two calls in one turn (content None, as OpenAI clients send it), two results."""
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": a}}
        for i, a in enumerate(arguments)
    ]
    return [
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_0", "content": "clear"},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ]


HISTORIES = {
    "tool_loop": (lambda arguments: tool_loop(arguments[0]), ['{"city": "Paris", "days": 2}']),
    "parallel_calls": (parallel_calls, ['{"city": "Paris"}', '{"city": "Rome", "days": 1}']),
}


@TEMPLATE_VARIANTS
@pytest.mark.parametrize("enable_thinking", [None, False])
@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_tool_history_renders_as_transformers(
    tokenizers, thinking_by_default, enable_thinking, history
):
    """OpenAI-style history (arguments as JSON strings) renders as transformers renders the
    same history with the arguments as mappings."""
    ours, reference = tokenizers[thinking_by_default]
    build, arguments = history
    mappings = [json.loads(a) for a in arguments]
    switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = reference.apply_chat_template(
        build(mappings), tools=TOOLS, tokenize=False, add_generation_prompt=True, **switch
    )
    assert chat_text(ours, build(arguments), enable_thinking, TOOLS) == expected
    assert "\n</parameter>\n</function>\n</tool_call>" in expected
    assert "<tool_response>" in expected


def test_tools_reach_the_prompt_of_stream_generate(make_checkpoint, tokenizers):
    model, tokenizer = load(make_checkpoint(Spec())[0])
    _, reference = tokenizers[False]  # the tiny checkpoints carry the 0.8B/2B template
    messages = tool_loop('{"city": "Paris", "days": 2}')
    expected = reference.apply_chat_template(
        tool_loop({"city": "Paris", "days": 2}),
        tools=TOOLS,
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = prepare_prompt(model, tokenizer, messages, tools=TOOLS).ids
    assert ids == reference.encode(expected, add_special_tokens=False)
    with pytest.raises(ValueError, match="chat messages"):
        prepare_prompt(model, tokenizer, "plain text", tools=TOOLS)


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ('{"city": "Paris"', r"messages\[2\]\.tool_calls\[0\]\.function\.arguments is not valid"),
        ('["Paris"]', r"messages\[2\]\.tool_calls\[0\]\.function\.arguments must be a JSON obj"),
    ],
)
def test_bad_call_arguments_name_the_message(arguments, problem):
    with pytest.raises(ValueError, match=problem):
        template_messages(tool_loop(arguments))


def test_messages_pass_through_untouched():
    messages = tool_loop({"city": "Paris"})
    assert template_messages(messages) == messages
    assert template_messages(tool_loop(""))[2]["tool_calls"][0]["function"]["arguments"] == {}


@pytest.mark.parametrize(
    "tools, problem",
    [
        ([{"name": "f", "parameters": {}}], r"tools\[0\] is not a function tool; write"),
        ([function("get weather")], r"tools\[0\]\.function\.name must be a name"),
        (
            [function("f"), {"type": "function", "function": {"name": "g", "parameters": 3}}],
            r"tools\[1\]\.function\.parameters must be a JSON schema",
        ),
        ({"type": "function"}, "must be a list"),
    ],
)
def test_bad_tool_definitions(tools, problem):
    with pytest.raises(ValueError, match=problem):
        template_tools(tools)
    with pytest.raises(ValueError, match=problem):
        ToolCallStream(tools)
