"""The OpenAI API: /v1/models, /v1/chat/completions, /v1/completions, each a thin translation
of a validated request into one engine call and of its events into OpenAI's JSON."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

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
    "not_found": "invalid_request_error",
    "too_large": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "server": "server_error",
}
ERROR_CODES = {
    "authentication": "invalid_api_key",
    "not_found": "model_not_found",
    "too_large": "request_too_large",
    "rate_limit": "rate_limit_exceeded",
}


def error_shape(error: APIError) -> dict:
    return {
        "error": {
            "message": error.message,
            "type": ERROR_TYPES[error.kind],
            "param": error.param,
            "code": ERROR_CODES.get(error.kind),
        }
    }


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The sampling fields both completion routes take (OpenAI's, then the common extras)."""

    model_config = ConfigDict(extra="ignore")  # fields of no effect here (user, store, ...)

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def generation(self, server: Server, prompt, **extra) -> GenerationRequest:
        check_model(server, self.model)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return GenerationRequest(
            prompt=prompt,
            max_tokens=check_max_tokens(server, self.max_tokens),
            temp=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=tuple(stop),
            **extra,
        )


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... go to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None

    def library(self) -> dict:
        """As the library takes it: OpenAI's `developer` role is the template's `system`."""
        message = self.model_dump(exclude_none=True, exclude_unset=True)
        return message | {"role": "system"} if self.role == "developer" else message


class ChatTemplateKwargs(BaseModel):
    enable_thinking: bool | None = None


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: ChatTemplateKwargs = ChatTemplateKwargs()
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] = "auto"
    response_format: dict[str, Any] | None = None

    def offered_tools(self) -> list[dict] | None:
        """The tools shown to the model: none with tool_choice "none"."""
        if self.tool_choice != "none" and self.tools:
            return self.tools
        return None


class CompletionRequest(Sampling):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False


async def list_models(server: Server, body: dict) -> Response:
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": server.model_id, "object": "model", "created": 0, "owned_by": "qwen35-mlx"}
            ],
        }
    )


async def chat_completions(server: Server, body: dict) -> Response:
    request = ChatCompletionRequest.model_validate(body)
    messages = [message.library() for message in request.messages]
    messages = await run_in_threadpool(resolve_media, messages, server.media)
    if request.max_completion_tokens is not None:
        request.max_tokens = request.max_completion_tokens
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "invalid_request", "top_logprobs needs logprobs: true", "logprobs")
    tools = request.offered_tools()
    generation = request.generation(
        server,
        messages,
        enable_thinking=request.chat_template_kwargs.enable_thinking,
        tools=tools,
        tool_choice=request.tool_choice if tools else "auto",
        response_format=request.response_format,
        top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )
    reply = Reply("chatcmpl", request.model, tools)
    handle, stream = await start(server, generation)
    if request.stream:
        chunks = reply.chat_chunks(stream, request.include_usage())
        return EventStream(with_error_chunk(chunks), handle)
    async for event in stream:
        reply.add(event)
    choice = {"index": 0, "message": reply.message(), "finish_reason": reply.finish_reason}
    choice["logprobs"] = {"content": reply.logprobs} if request.logprobs else None
    return JSONResponse(reply.body("chat.completion", [choice]))


async def completions(server: Server, body: dict) -> Response:
    request = CompletionRequest.model_validate(body)
    generation = request.generation(server, request.prompt, top_logprobs=request.logprobs)
    reply = Reply("cmpl", request.model)
    handle, stream = await start(server, generation)
    if request.stream:
        chunks = reply.text_chunks(stream, request.include_usage())
        return EventStream(with_error_chunk(chunks), handle)
    async for event in stream:
        reply.add(event)
    choice = {"index": 0, "text": reply.reasoning + reply.content}
    choice["finish_reason"] = reply.finish_reason
    choice["logprobs"] = None if request.logprobs is None else legacy_logprobs(reply.logprobs)
    return JSONResponse(reply.body("text_completion", [choice]))


class Reply:
    """One reply as it is built: reasoning, text, tool calls, log-probabilities, finish and
    usage. With `tools`, the answer text is read for tool calls as it arrives."""

    def __init__(self, prefix: str, model: str, tools: list[dict] | None = None):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.model, self.created = model, int(time.time())
        self.content = self.reasoning = ""
        self.tool_calls: list[dict] = []
        self.calls = None if tools is None else ToolCallStream(tools)
        self.logprobs: list[dict] = []
        self.finish_reason = "length"
        self.usage: Usage | None = None

    def add(self, event: Event) -> list[dict]:
        """Take `event`; returns the chat deltas it makes."""
        if event.logprob is not None:
            self.logprobs.append(token_logprobs(event))
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        self.usage = event.usage
        if event.reasoning:
            self.reasoning += event.text
            return [{"reasoning_content": event.text}] if event.text else []
        if self.calls is None:
            pieces = [TextDelta(event.text)] if event.text else []
        else:
            pieces = self.calls.feed(event.text)
            pieces += self.calls.finish() if event.finish_reason else []
        deltas = [delta for piece in pieces if (delta := self._piece(piece))]
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        return deltas

    def _piece(self, piece) -> dict | None:
        if isinstance(piece, TextDelta):
            self.content += piece.text
            return {"content": piece.text}
        if isinstance(piece, ToolCallStart):

            def call() -> dict:  # a fresh one each: the reply's grows, the delta is sent
                function = {"name": piece.name, "arguments": ""}
                return {"id": piece.id, "type": "function", "function": function}

            self.tool_calls.append(call())
            return {"tool_calls": [{"index": piece.index, **call()}]}
        if isinstance(piece, ToolCallArguments):
            self.tool_calls[piece.index]["function"]["arguments"] += piece.delta
            arguments = {"arguments": piece.delta}
            return {"tool_calls": [{"index": piece.index, "function": arguments}]}
        return None  # ToolCallEnd: the call was complete with its arguments

    def message(self) -> dict:
        message = {"role": "assistant", "content": self.content or None}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        elif message["content"] is None:
            message["content"] = ""
        return message

    def body(self, kind: str, choices: list[dict], with_usage: bool = True) -> dict:
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if with_usage:
            body["usage"] = usage_json(self.usage)
        return body

    async def chat_chunks(self, stream: AsyncIterator[Event], usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, logprobs=None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse(self.body("chat.completion.chunk", [choice], with_usage=False))

        yield chunk({"role": "assistant", "content": ""})
        async for event in stream:
            deltas = self.add(event)
            if event.logprob is not None:  # the token's log-probabilities go with its first delta
                logprobs = {"content": [token_logprobs(event)]}
                yield chunk(deltas.pop(0) if deltas else {"content": ""}, logprobs=logprobs)
            for delta in deltas:
                yield chunk(delta)
        yield chunk({}, self.finish_reason)
        async for line in self.closing(usage, "chat.completion.chunk"):
            yield line

    async def text_chunks(self, stream: AsyncIterator[Event], usage: bool) -> AsyncIterator[str]:
        async for event in stream:
            self.add(event)
            logprobs = None if event.logprob is None else legacy_logprobs([token_logprobs(event)])
            if event.text or logprobs:
                choice = {"index": 0, "text": event.text, "logprobs": logprobs}
                yield sse(self.body("text_completion", [{**choice, "finish_reason": None}], False))
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": self.finish_reason}
        yield sse(self.body("text_completion", [choice], with_usage=False))
        async for line in self.closing(usage, "text_completion"):
            yield line

    async def closing(self, usage: bool, kind: str) -> AsyncIterator[str]:
        if usage:
            yield sse(self.body(kind, []))
        yield "data: [DONE]\n\n"


async def with_error_chunk(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The chunks; an error once streaming started ends the stream with an error chunk."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as error:
        yield sse(error_shape(as_api_error(error)))


def sse(value: dict) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"


def usage_json(usage: Usage | None) -> dict:
    prompt = 0 if usage is None else usage.prompt_tokens
    completion = 0 if usage is None else usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0 if usage is None else usage.cached_tokens},
    }


def token_logprobs(event: Event) -> dict:
    def entry(item) -> dict:
        return {"token": item.token, "logprob": item.logprob, "bytes": list(item.token.encode())}

    return {**entry(event.logprob), "top_logprobs": [entry(t) for t in event.top_logprobs]}


def legacy_logprobs(entries: list[dict]) -> dict:
    """The /v1/completions form: parallel lists, top log-probabilities as {token: logprob}."""
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
    }
