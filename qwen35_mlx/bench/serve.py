"""The server's warm-request time to first token with and without its prefix cache, in one run.

For each history length: a real server on loopback (uvicorn, the engine thread) gets a
conversation whose first user message is a document of that many tokens; then the client
resends the history with the reply and a new question, as OpenAI-style clients do, and the time
to the first streamed token of that request is measured. Once with the engine's prefix cache,
once with a prefix cache that keeps nothing (every request prefills its whole history).
Needs the `server` extra.
"""

from __future__ import annotations

import http.client
import json
import time

from ..loading import load
from ..prompt_cache import PrefixCache
from ..server.app import Server, create_app
from ..server.engine import Engine
from ..server.run import serve_in_thread
from .prompt_cache import MIN_HISTORY, document
from .report import print_rows, progress

MODEL_ID = "bench"


def bench_serve(model_dir: str, histories: list[int]) -> list[list]:
    if min(histories) < MIN_HISTORY:
        raise ValueError(f"--history lengths must be at least {MIN_HISTORY} tokens")
    model, tokenizer = load(model_dir)
    rows = []
    for tokens in histories:
        first = [{"role": "user", "content": document(tokenizer, tokens)}]
        timed = {}
        for name, kept in (("cache", 8 << 30), ("no cache", 0)):
            progress(f"{tokens} tokens: {name}")
            engine = Engine(model, tokenizer, prefix_cache=PrefixCache(max_bytes=kept)).start()
            port, stop = serve_in_thread(create_app(Server(engine, model_id=MODEL_ID)))
            try:
                _, reply, _ = first_token(port, first, max_tokens=4)  # the first turn
                history = first + [
                    {"role": "assistant", "content": reply or "Noted."},
                    {"role": "user", "content": "Which word comes third?"},
                ]
                timed[name] = first_token(port, history, max_tokens=1)
            finally:
                stop()
                engine.stop()
        (warm, _, usage), (cold, _, plain) = timed["cache"], timed["no cache"]
        rows.append([plain["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"],
                     f"{cold:.3f}", f"{warm:.3f}", f"{cold / warm:.1f}x"])  # fmt: skip
    print_rows(
        ("history tokens", "from cache", "no cache TTFT s", "prefix cache TTFT s", "speed-up"),
        rows,
    )
    return rows


def first_token(port: int, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    """(seconds to the first streamed token, the reply, usage) of a streamed chat request."""
    body = {
        "model": MODEL_ID,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    response = connection.getresponse()
    first = response.readline()  # the server answers once the first token is out
    seconds = time.perf_counter() - start
    lines = (first + response.read()).decode().splitlines()
    connection.close()
    chunks = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]
    if "error" in chunks[0]:
        raise RuntimeError(f"the server refused the request: {chunks[0]['error']['message']}")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return seconds, text, chunks[-1]["usage"]
