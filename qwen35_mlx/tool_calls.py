"""Tool calls: Qwen3.5's XML call markup parsed into typed calls, and OpenAI-style messages and
tool definitions made ready for the chat template.

The model calls a tool by replying, after any text, with
`<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`
(one block per call); values are raw text, typed here by each tool's JSON schema. The format,
the typing rules and what happens to broken markup: docs/ARCHITECTURE.md §13.

`parse_tool_calls` reads a whole reply; `ToolCallStream` reads one as it is generated and emits
`TextDelta`, `ToolCallStart`, `ToolCallArguments` and `ToolCallEnd` events, enough for OpenAI
`tool_calls` deltas and Anthropic `tool_use` blocks. `template_messages` and `template_tools`
prepare a conversation and its tools for the chat template (which wants arguments as mappings,
where OpenAI clients send JSON strings).
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"
# a name the format can carry: no whitespace, no markup
NAME = re.compile(r"[^\s<>]+")


@dataclass
class ToolCall:
    """One call the model made.

    id: a fresh id ("call_" + 24 hex digits).
    name: the function's name as the model wrote it (it may name no tool: see `problems`).
    arguments: parameter name -> value typed by the tool's schema; values that could not be
        typed are kept as the text the model wrote.
    problems: what did not fit the tools given, one sentence each (an unknown function or
        parameter, a value that does not parse as its type); empty when all fit.
    """

    id: str
    name: str
    arguments: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def arguments_json(self) -> str:
        """The arguments as OpenAI's `function.arguments` string (Anthropic's `input`)."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class TextDelta:
    """Reply text outside tool calls."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call begins: its index among this reply's calls (from 0), id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """A fragment of the call's arguments as a JSON object; the fragments of one call joined
    are `call.arguments_json`."""

    index: int
    delta: str


@dataclass(frozen=True)
class ToolCallEnd:
    """A call is complete."""

    index: int
    call: ToolCall


Event = TextDelta | ToolCallStart | ToolCallArguments | ToolCallEnd


def parse_tool_calls(
    text: str, tools: Sequence[Mapping] | None = None
) -> tuple[str, list[ToolCall]]:
    """A whole reply (its answer, without the reasoning) -> (the text outside the calls, the
    calls). Markup that does not form a call, such as a block cut off by `max_tokens`, stays
    in the text.

    Args:
        text: the reply.
        tools: the tool definitions the prompt offered (OpenAI form); they type the arguments.
    """
    stream = ToolCallStream(tools)
    events = stream.feed(text) + stream.finish()
    content = "".join(event.text for event in events if isinstance(event, TextDelta))
    return content, [event.call for event in events if isinstance(event, ToolCallEnd)]


class ToolCallStream:
    """Reads a reply as it is generated and tells text from tool calls.

    Text that might be the start of `<tool_call>` (and whitespace, which is dropped before a
    call) is held back until known. A call is emitted whole once its `</function>` arrives, as
    `ToolCallStart`, one `ToolCallArguments` holding all its arguments, and `ToolCallEnd`: a
    value is typed only once it is complete, and a call cut off before its end is never
    announced (it comes back as text from `finish`).

    Args:
        tools: the tool definitions the prompt offered (OpenAI form); they type the arguments.
    """

    def __init__(self, tools: Sequence[Mapping] | None = None):
        self.schemas = parameter_schemas(tools)
        self.calls = 0  # calls emitted so far
        self._pending = ""  # text not yet decided
        self._gap = ""  # whitespace dropped before `<tool_call>`, given back if no call follows
        # "text", "open" (after `<tool_call>`) or "closing" (after a call's `</function>`,
        # until text other than `</tool_call>` and whitespace)
        self._state = "text"

    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of the reply."""
        self._pending += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """Events for what is still held back once the reply has ended: text, including any
        unterminated call markup."""
        pending, self._pending = self._pending, ""
        if self._state == "open":
            pending = self._gap + CALL_OPEN + pending
        elif self._state == "closing" and CALL_CLOSE.startswith(pending.strip()):
            pending = ""
        self._state = "text"
        return [TextDelta(pending)] if pending else []

    def _step(self, events: list[Event]) -> bool:
        """Consume what can be decided from the start of the pending text; False when the rest
        needs more text."""
        if self._state == "text":
            return self._step_text(events)
        body = self._pending.lstrip()
        if self._state == "closing":  # whitespace after a call is dropped
            self._pending = body
            if body.startswith(CALL_CLOSE):
                self._pending = body[len(CALL_CLOSE) :]
                return True
        if body.startswith(FUNCTION_OPEN):
            return self._step_function(events, body)
        if FUNCTION_OPEN.startswith(body) or (
            self._state == "closing" and CALL_CLOSE.startswith(body)
        ):
            return False  # too little text to tell
        self._not_a_call(events)
        return True

    def _step_text(self, events: list[Event]) -> bool:
        start = self._pending.find(CALL_OPEN)
        if start < 0:
            ready = len(self._pending) - held_back(self._pending)
            emit_text(events, self._pending[:ready])
            self._pending = self._pending[ready:]
            return False
        before = self._pending[:start]
        emit_text(events, before.rstrip())
        self._gap = before[len(before.rstrip()) :]
        self._pending, self._state = self._pending[start + len(CALL_OPEN) :], "open"
        return True

    def _step_function(self, events: list[Event], body: str) -> bool:
        end = first_of(body, (FUNCTION_CLOSE, CALL_CLOSE))  # </function> may be missing
        if end is None:
            return False
        call = parse_function(body[len(FUNCTION_OPEN) : end[0]], self.schemas)
        if call is None:  # it names no function
            self._not_a_call(events)
            return True
        index, self.calls = self.calls, self.calls + 1
        events += [
            ToolCallStart(index, call.id, call.name),
            ToolCallArguments(index, call.arguments_json),
            ToolCallEnd(index, call),
        ]
        # then the block's `</tool_call>`, or another `<function=`
        self._pending = body[end[0] + (len(FUNCTION_CLOSE) if end[1] == FUNCTION_CLOSE else 0) :]
        self._state = "closing"
        return True

    def _not_a_call(self, events: list[Event]) -> None:
        """Markup that forms no call is text, as written."""
        if self._state == "open":
            emit_text(events, self._gap + CALL_OPEN)
        self._state = "text"


def emit_text(events: list[Event], text: str) -> None:
    if text:
        events.append(TextDelta(text))


def held_back(text: str) -> int:
    """How many characters at the end of `text` must wait: trailing whitespace (dropped if a
    call follows) and a partial `<tool_call>`."""
    for length in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-length:]):
            return length + len(text[:-length]) - len(text[:-length].rstrip())
    return len(text) - len(text.rstrip())


def first_of(text: str, tags: Sequence[str]) -> tuple[int, str] | None:
    """(position, tag) of the earliest of `tags` in `text`; None if none occurs."""
    found = [(text.find(tag), tag) for tag in tags if tag in text]
    return min(found) if found else None


def parse_function(body: str, schemas: Mapping[str, Mapping]) -> ToolCall | None:
    """The inside of `<function=…</function>` (`NAME>` then parameters) as a call; None when
    it names no function."""
    name_end = body.find(">")
    name = body[:name_end].strip() if name_end >= 0 else ""
    if not NAME.fullmatch(name):
        return None
    problems = []
    properties = schemas.get(name)
    if properties is None:
        problems.append(f"function {name!r} is not among the tools offered")
    arguments = {}
    for chunk in body[name_end + 1 :].split(PARAMETER_OPEN)[1:]:
        parameter, _, value = chunk.partition(">")
        parameter = parameter.strip()
        # the value ends at </parameter>, or at the next parameter or the end when it is missing
        value = value.split(PARAMETER_CLOSE)[0]
        value = value.removeprefix("\n").removesuffix("\n")
        schema = None if properties is None else properties.get(parameter)
        if schema is None:
            if properties is not None:
                problems.append(
                    f"parameter {parameter!r} is not in {name!r}'s schema; kept as text"
                )
            arguments[parameter] = value
            continue
        arguments[parameter], problem = typed_value(value, schema)
        if problem:
            problems.append(f"parameter {parameter!r}: {problem}; kept as text")
    return ToolCall(f"call_{secrets.token_hex(12)}", name, arguments, problems)


def typed_value(text: str, schema: Mapping) -> tuple[Any, str | None]:
    """A parameter's text typed by its JSON schema: (value, None), or (text, why) when it is
    none of the schema's types. Types other than string are tried first and string last, so
    that `{"type": ["integer", "string"]}` reads "3" as 3."""
    types = schema_types(schema)
    if not types:  # any value: JSON objects and arrays are read, the rest stays text
        value = json_value(text)
        return (value, None) if isinstance(value, (dict, list)) else (text, None)
    for kind in sorted(types, key=lambda kind: kind == "string"):
        if kind == "string":
            return text, None
        value = PARSERS[kind](text.strip())
        if value is not NOT_PARSED:
            return value, None
    return text, f"{text!r} is not {' or '.join(types)}"


def schema_types(schema: Mapping) -> list[str]:
    """The JSON types a schema admits, from `type` (a name or a list), `anyOf`/`oneOf`, or
    `enum`/`const` values; [] when it does not say (any value)."""
    kinds = schema.get("type")
    if isinstance(kinds, str):
        return [kinds] if kinds in PARSERS or kinds == "string" else []
    if isinstance(kinds, list):
        return [kind for kind in kinds if kind in PARSERS or kind == "string"]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return unique(kind for option in schema[key] for kind in schema_types(option))
    values = schema["enum"] if isinstance(schema.get("enum"), list) else None
    if values is None and "const" in schema:
        values = [schema["const"]]
    return unique(json_type(value) for value in values or ())


def unique(kinds) -> list[str]:
    return list(dict.fromkeys(kinds))


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "string")


NOT_PARSED = object()


def json_value(text: str):
    """`text` as a JSON value (NaN and Infinity refused: clients could not read them back);
    NOT_PARSED when it is none."""

    def refuse(constant):
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return NOT_PARSED


def parse_as(kind: type):
    def parse(text: str):
        value = json_value(text)
        return value if isinstance(value, kind) else NOT_PARSED

    return parse


def parse_number(text: str):
    value = json_value(text)
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    return value if finite and not isinstance(value, bool) else NOT_PARSED


def parse_integer(text: str):
    # JSON Schema counts 3.0 as an integer
    value = parse_number(text)
    return int(value) if value is not NOT_PARSED and value == int(value) else NOT_PARSED


def parse_boolean(text: str):
    # the chat template writes Python's True/False (`| string`); JSON writes true/false
    return {"true": True, "false": False}.get(text.lower(), NOT_PARSED)


def parse_null(text: str):
    return None if text.lower() in ("null", "none") else NOT_PARSED


PARSERS = {
    "integer": parse_integer,
    "number": parse_number,
    "boolean": parse_boolean,
    "null": parse_null,
    "object": parse_as(dict),
    "array": parse_as(list),
}


def parameter_schemas(tools: Sequence[Mapping] | None) -> dict[str, Mapping]:
    """Function name -> its parameters' schemas (`properties`), from checked tool definitions."""
    return {
        tool["function"]["name"]: (tool["function"].get("parameters") or {}).get("properties") or {}
        for tool in template_tools(tools) or ()
    }


def template_tools(tools: Sequence[Mapping] | None) -> list[Mapping] | None:
    """Tool definitions checked for the chat template: each
    `{"type": "function", "function": {"name": ..., "description": ..., "parameters": {JSON
    schema of an object}}}` (OpenAI's form); None or [] means no tools."""
    if not tools:
        return None
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool definitions, got a {type(tools).__name__}")
    example = '{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}'
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not function:
            raise ValueError(f"tools[{index}] is not a function tool; write it as {example}")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(
                f"tools[{index}].function.name must be a name without spaces or '<>', got {name!r}"
            )
        parameters = function.get("parameters")
        if parameters is not None and not (
            isinstance(parameters, Mapping)
            and isinstance(parameters.get("properties", {}), Mapping)
        ):
            raise ValueError(
                f"tools[{index}].function.parameters must be a JSON schema object such as "
                '{"type": "object", "properties": {"city": {"type": "string"}}}'
            )
    return list(tools)


def template_messages(messages: Sequence[Mapping]) -> list[Mapping]:
    """Messages ready for the chat template: an assistant's `tool_calls` whose
    `function.arguments` is a JSON string (as OpenAI clients send them) get the mapping it
    holds; everything else, `role: "tool"` results included, passes through as it is."""
    return [
        prepared_tool_calls(index, message) if message.get("tool_calls") else message
        for index, message in enumerate(messages)
    ]


def prepared_tool_calls(index: int, message: Mapping) -> dict:
    calls = message["tool_calls"]
    if isinstance(calls, (str, Mapping)) or not isinstance(calls, Sequence):
        raise ValueError(f"messages[{index}].tool_calls must be a list of calls")
    prepared = []
    for number, call in enumerate(calls):
        where = f"messages[{index}].tool_calls[{number}]"
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(
                f"{where} has no function name; write "
                '{"type": "function", "function": {"name": ..., "arguments": "{...}"}}'
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as error:
                raise ValueError(
                    f"{where}.function.arguments is not valid JSON ({error}); send the "
                    'arguments as a JSON object string, e.g. \'{"city": "Paris"}\''
                ) from None
        if not isinstance(arguments, Mapping):
            raise ValueError(
                f"{where}.function.arguments must be a JSON object (parameter name -> value), "
                f"got a {type(arguments).__name__}"
            )
        prepared.append({**call, "function": {**function, "arguments": arguments}})
    return {**message, "tool_calls": prepared}
