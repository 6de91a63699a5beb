"""The Anthropic API: POST /v1/messages, a thin translation of a validated request into the
library's (OpenAI-style) messages, one engine call, and its events into Anthropic's JSON and
stream events (message_start, content_block_start/delta/stop, message_delta, message_stop)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..tool_calls import TextDelta, ToolCallArguments, ToolCallStart, ToolCallStream
from .app import (
    APIError,
    EventStream,
    Server,
    as_api_error,
    check_max_tokens,
    check_model,
    start,
)
from .engine import Event, GenerationRequest, Usage
from .media import resolve_media

ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "rate_limit": "rate_limit_error",
    "server": "api_error",
}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def error_shape(error: APIError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES[error.kind], "message": error.message}}


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ImageSource(BaseModel):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None

    def url_or_data(self) -> str:
        if self.type == "url":
            if not self.url:
                raise APIError(400, "invalid_request", "an image source of type url needs url")
            return self.url
        if not self.media_type or not self.data:
            raise APIError(
                400, "invalid_request", "a base64 image source needs media_type and data"
            )
        return f"data:{self.media_type};base64,{self.data}"


class ImageBlock(BaseModel):
    type: Literal["image"]
    source: ImageSource


class ThinkingBlock(BaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] = ""
    is_error: bool = False


Block = Annotated[
    TextBlock | ImageBlock | ThinkingBlock | ToolUseBlock | ToolResultBlock,
    Field(discriminator="type"),
]


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Thinking(BaseModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class Tool(BaseModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]

    def openai(self) -> dict:
        function = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None

    def openai(self) -> str | dict:
        """As OpenAI's tool_choice (which the engine takes)."""
        if self.type == "tool":
            if not self.name:
                raise APIError(400, "invalid_request", "tool_choice of type tool needs name")
            return {"type": "function", "function": {"name": self.name}}
        return {"any": "required"}.get(self.type, "auto")


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # metadata, service_tier, ...

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] = []
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    thinking: Thinking | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice = ToolChoice(type="auto")

    def offered_tools(self) -> list[dict] | None:
        """The tools in OpenAI's form, as the chat template takes them; none with "none"."""
        if self.tool_choice.type == "none" or not self.tools:
            return None
        return [tool.openai() for tool in self.tools]

    def library_messages(self) -> list[dict]:
        """The conversation in the library's OpenAI-style form."""
        messages = []
        if self.system:
            system = self.system
            text = system if isinstance(system, str) else "".join(b.text for b in system)
            messages.append({"role": "system", "content": text})
        for message in self.messages:
            messages.extend(library_message(message))
        return messages

    def enable_thinking(self) -> bool | None:
        return None if self.thinking is None else self.thinking.type != "disabled"


def library_message(message: Message) -> list[dict]:
    """One Anthropic message as library messages: tool results become `tool` messages (before
    the user's text), thinking becomes `reasoning_content`, tool uses `tool_calls`."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    results, content, reasoning, calls = [], [], [], []
    for block in message.content:
        if isinstance(block, ToolResultBlock):
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, **items(block)})
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            function = {"name": block.name, "arguments": block.input}
            calls.append({"id": block.id, "type": "function", "function": function})
        else:
            content.append(content_item(block))
    library = {"role": message.role, "content": content}
    if reasoning:
        library["reasoning_content"] = "".join(reasoning)
    if calls:
        library["tool_calls"] = calls
    return results + ([library] if content or reasoning or calls else [])


def items(result: ToolResultBlock) -> dict:
    if isinstance(result.content, str):
        return {"content": result.content}
    return {"content": [content_item(block) for block in result.content]}


def content_item(block: TextBlock | ImageBlock) -> dict:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    return {"type": "image_url", "image_url": {"url": block.source.url_or_data()}}


async def messages(server: Server, body: dict) -> Response:
    request = MessagesRequest.model_validate(body)
    check_model(server, request.model)
    library = await run_in_threadpool(resolve_media, request.library_messages(), server.media)
    tools = request.offered_tools()
    generation = GenerationRequest(
        prompt=library,
        max_tokens=check_max_tokens(server, request.max_tokens),
        temp=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        stop=tuple(request.stop_sequences),
        enable_thinking=request.enable_thinking(),
        tools=tools,
        tool_choice=request.tool_choice.openai() if tools else "auto",
    )
    reply = Reply(request.model, tools)
    handle, stream = await start(server, generation)
    if request.stream:
        return EventStream(reply.stream(stream), handle)
    async for event in stream:
        reply.add(event)
    return JSONResponse(reply.message())


class Reply:
    """A reply as content blocks (thinking, text, tool_use) and the stream events that build
    them. With `tools`, the answer text is read for tool calls as it arrives."""

    def __init__(self, model: str, tools: list[dict] | None = None):
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.blocks: list[dict] = []
        self.open = False  # whether the last block is still being written
        self.calls = None if tools is None else ToolCallStream(tools)
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: Usage | None = None

    def add(self, event: Event) -> list[tuple[str, dict]]:
        """Take `event`; returns the stream events (name, data) it makes."""
        self.usage = event.usage
        if event.finish_reason is not None:
            reason = "stop_sequence" if event.stop_sequence else STOP_REASONS[event.finish_reason]
            self.stop_reason, self.stop_sequence = reason, event.stop_sequence
        if event.reasoning:
            return self._text("thinking", event.text)
        if self.calls is None:
            pieces = [TextDelta(event.text)]
        else:
            pieces = self.calls.feed(event.text)
            pieces += self.calls.finish() if event.finish_reason else []
        changes = [change for piece in pieces for change in self._piece(piece)]
        if self.stop_reason == "end_turn" and any(b["type"] == "tool_use" for b in self.blocks):
            self.stop_reason = "tool_use"
        return changes

    def _piece(self, piece) -> list[tuple[str, dict]]:
        if isinstance(piece, TextDelta):
            return self._text("text", piece.text)
        if isinstance(piece, ToolCallStart):
            block = {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}}
            return self._start(block)
        if isinstance(piece, ToolCallArguments):
            delta = {"type": "input_json_delta", "partial_json": piece.delta}
            return [self._delta(delta)]
        self.blocks[-1]["input"] = piece.call.arguments  # ToolCallEnd
        return self._stop()

    def _text(self, kind: str, text: str) -> list[tuple[str, dict]]:
        if not text:
            return []
        changes = []
        if not (self.open and self.blocks[-1]["type"] == kind):
            signature = {"signature": ""} if kind == "thinking" else {}
            changes = self._start({"type": kind, kind: ""} | signature)
        self.blocks[-1][kind] += text
        return changes + [self._delta({"type": f"{kind}_delta", kind: text})]

    def _start(self, block: dict) -> list[tuple[str, dict]]:
        changes = self._stop()
        self.blocks.append(block)
        self.open = True
        start = {"type": "content_block_start", "index": len(self.blocks) - 1}
        return changes + [("content_block_start", start | {"content_block": dict(block)})]

    def _delta(self, delta: dict) -> tuple[str, dict]:
        index = len(self.blocks) - 1
        return "content_block_delta", {
            "type": "content_block_delta",
            "index": index,
            "delta": delta,
        }

    def _stop(self) -> list[tuple[str, dict]]:
        if not self.open:
            return []
        self.open = False
        index = len(self.blocks) - 1
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def message(self, streaming: bool = False) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [] if streaming else self.blocks,
            "stop_reason": None if streaming else self.stop_reason,
            "stop_sequence": None if streaming else self.stop_sequence,
            "usage": usage_json(self.usage),
        }

    async def stream(self, stream: AsyncIterator[Event]) -> AsyncIterator[str]:
        try:
            async for name, data in self._events(stream):
                yield sse(name, data)
        except Exception as error:  # after the response started: an error event ends it
            yield sse("error", error_shape(as_api_error(error)))

    async def _events(self, stream: AsyncIterator[Event]) -> AsyncIterator[tuple[str, dict]]:
        started = False
        async for event in stream:
            if not started:
                self.usage, started = event.usage, True
                yield "message_start", {"type": "message_start", "message": self.message(True)}
            for change in self.add(event):
                yield change
        if not started:
            yield "message_start", {"type": "message_start", "message": self.message(True)}
        for change in self._stop():
            yield change
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        usage = {"output_tokens": 0 if self.usage is None else self.usage.completion_tokens}
        yield "message_delta", {"type": "message_delta", "delta": delta, "usage": usage}
        yield "message_stop", {"type": "message_stop"}


def usage_json(usage: Usage | None) -> dict:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0}
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
