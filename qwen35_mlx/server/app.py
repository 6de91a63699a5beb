"""The HTTP side: routes, the API key, body limits and errors in each API's own shape.

Starlette rather than FastAPI: each route validates its body with pydantic itself, so that a bad
request is answered in its API's error shape (FastAPI's automatic validation answers 422 in its
own), and nothing else of FastAPI is used (docs/ARCHITECTURE.md §15).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..generate import ContextLengthError
from .engine import Engine, Event, GenerationRequest, Handle, QueueFullError
from .media import MediaPolicy

log = logging.getLogger("qwen35_mlx.server")
STATIC = Path(__file__).parent / "static"


@dataclass
class Server:
    """What handlers share: the engine and the limits."""

    engine: Engine
    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 32 << 20
    max_tokens_limit: int = 32768
    media: MediaPolicy = field(default_factory=MediaPolicy)


class APIError(Exception):
    """An error answered to the client. kind: invalid_request, authentication, not_found,
    too_large, rate_limit or server; each API names it in its own shape."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param = status, kind, message, param


ErrorShape = Callable[[APIError], dict]
Handler = Callable[[Server, dict], Awaitable[Response]]


def endpoint(handler: Handler, shape: ErrorShape, key_headers=("authorization",)):
    """A route: API key, body read within the size limit and parsed as a JSON object, then
    `handler(server, body)`; every failure answered in `shape`, never with a traceback."""

    async def route(request: Request) -> Response:
        server: Server = request.app.state.server
        try:
            check_api_key(server, request, key_headers)
            body = (
                {} if request.method == "GET" else await read_json(request, server.max_body_bytes)
            )
            return await unless_disconnected(request, handler(server, body))
        except Exception as error:
            return error_response(as_api_error(error), shape)

    return route


async def unless_disconnected(request: Request, answer: Awaitable[Response]) -> Response:
    """`answer`, abandoned if the client goes away first: a whole (non-streamed) reply is
    cancelled, and `events` cancels its request, so the engine frees the slot at the next step.
    A stream is answered at its first event and watches for the disconnect itself."""
    answering = asyncio.ensure_future(answer)
    disconnected = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait((answering, disconnected), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    if not answering.done():
        answering.cancel()
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    return answering.result()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body is already read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def as_api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValidationError):
        return APIError(400, "invalid_request", validation_message(error), validation_param(error))
    if isinstance(error, QueueFullError):
        return APIError(429, "rate_limit", str(error))
    if isinstance(error, ContextLengthError):
        return APIError(400, "invalid_request", str(error), "messages")
    if isinstance(error, ValueError):  # bad input found by the library: it says what and how
        return APIError(400, "invalid_request", str(error))
    log.error("unexpected error", exc_info=error)
    return APIError(500, "server", "the server failed on this request; see the server's log")


def error_response(error: APIError, shape: ErrorShape) -> JSONResponse:
    return JSONResponse(shape(error), status_code=error.status)


def validation_message(error: ValidationError) -> str:
    problems = [
        f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}"
        for item in error.errors()[:5]
    ]
    return "invalid request: " + "; ".join(problems)


def validation_param(error: ValidationError) -> str | None:
    errors = error.errors()
    return ".".join(str(part) for part in errors[0]["loc"]) if errors else None


def check_api_key(server: Server, request: Request, key_headers) -> None:
    if server.api_key is None:
        return
    for header in key_headers:
        given = request.headers.get(header, "")
        if header == "authorization":
            given = given.removeprefix("Bearer ").strip()
        if given and hmac.compare_digest(given.encode(), server.api_key.encode()):
            return
    raise APIError(
        401, "authentication", "missing or wrong API key; send 'Authorization: Bearer <key>'"
    )


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (checked as it arrives)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise APIError(400, "invalid_request", f"the body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise APIError(400, "invalid_request", "the body must be a JSON object")
    return value


def _too_large(limit: int) -> APIError:
    return APIError(
        413, "too_large", f"the body is larger than the server's limit of {limit} bytes"
    )


def check_model(server: Server, model: str) -> None:
    if model != server.model_id:
        raise APIError(
            404,
            "not_found",
            f"model {model!r} is not served here; this server serves {server.model_id!r}",
            "model",
        )


def check_max_tokens(server: Server, max_tokens: int | None) -> int:
    """The tokens to generate: what was asked, within the server's limit."""
    if max_tokens is None:
        return server.max_tokens_limit
    if max_tokens > server.max_tokens_limit:
        raise APIError(
            400,
            "invalid_request",
            f"max_tokens is {max_tokens}, above the server's limit of "
            f"{server.max_tokens_limit} (--max-tokens-limit)",
            "max_tokens",
        )
    return max_tokens


async def start(server: Server, request: GenerationRequest) -> tuple[Handle, AsyncIterator[Event]]:
    """Submit `request`: (its handle, its events), the first one already arrived."""
    handle = server.engine.submit(request)
    return handle, events(await first_event(handle), handle)


async def first_event(handle: Handle) -> Event | None:
    """The request's first event, awaited before answering so that errors found before
    generation (a context overflow, a bad image) get their HTTP status."""
    try:
        return await anext(handle)
    except StopAsyncIteration:
        return None
    except BaseException:
        handle.cancel()
        raise


async def events(first: Event | None, handle: Handle) -> AsyncIterator[Event]:
    try:
        if first is not None:
            yield first
        async for event in handle:
            yield event
    finally:  # abandoned by its reader (a disconnect): stop generating; no-op once finished
        handle.cancel()


class EventStream(StreamingResponse):
    """Server-sent events whose request is cancelled however the response ends (a client that
    disconnects frees the engine at the next token)."""

    def __init__(self, chunks: AsyncIterator[str], handle: Handle):
        super().__init__(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


def create_app(server: Server) -> Starlette:
    """The ASGI app serving `server`'s engine."""
    from . import anthropic, openai

    def openai_route(path, handler, methods=("POST",)):
        return Route(path, endpoint(handler, openai.error_shape), methods=list(methods))

    routes = [
        openai_route("/v1/models", openai.list_models, methods=("GET",)),
        openai_route("/v1/chat/completions", openai.chat_completions),
        openai_route("/v1/completions", openai.completions),
        Route(
            "/v1/messages",
            endpoint(anthropic.messages, anthropic.error_shape, ("x-api-key", "authorization")),
            methods=["POST"],
        ),
        Route("/", index, methods=["GET"]),
    ]
    if STATIC.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    app.state.server = server
    return app


async def index(request: Request) -> Response:
    page = STATIC / "index.html"
    if not page.is_file():
        raise HTTPException(404, "no chat page in this installation")
    return FileResponse(page)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Unknown routes and methods, in the OpenAI shape (most clients speak it)."""
    from .openai import error_shape

    kind = "not_found" if error.status_code == 404 else "invalid_request"
    return error_response(APIError(error.status_code, kind, str(error.detail)), error_shape)


async def internal_error(request: Request, error: Exception) -> Response:
    from .openai import error_shape

    return error_response(as_api_error(error), error_shape)
