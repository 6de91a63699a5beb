"""Continuous batching against serving requests one at a time, measured in one run.

For each client count N: N greedy requests (random token-id prompts of different lengths, so
the rows sit at different offsets) served one after another by `stream_generate`, then all
together by a `BatchGenerator` of N slots; aggregate generated tokens per second of each
(prefill included, as a client sees it), their ratio, and whether every request got the same
tokens both ways. With `--http`, the same through a real server on loopback (the `server`
extra): N concurrent HTTP clients of `/v1/completions` against an engine of one slot (requests
served one at a time) and against one of N slots; the replies' texts are compared.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..batch import BatchGenerator
from ..generate import check_whole, stream_generate
from ..loading import load
from .report import print_rows, progress


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent requests"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=32,
        help="the shortest prompt; request i's is (1 + i/4) times as long",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument(
        "--http",
        action="store_true",
        help="through a real server on loopback: concurrent HTTP clients against a server of "
        "one slot and one of N slots (needs the server extra)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weight dtype (default: the checkpoint's; the CPU backend has BLAS for float32 "
        "only, where a batch's matmuls cost less per row than one row's)",
    )


def check_args(args: argparse.Namespace) -> None:
    check_whole("--tokens", args.tokens, 1)
    check_whole("--prompt-tokens", args.prompt_tokens, 1)
    for clients in args.clients:
        check_whole("--clients", clients, 1)


def one_at_a_time(model, tokenizer, prompts, max_tokens: int) -> list[list[int]]:
    return [
        [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]
        for prompt in prompts
    ]


def batched(model, tokenizer, prompts, max_tokens: int) -> list[list[int]]:
    generator = BatchGenerator(model, tokenizer, max_batch=len(prompts))
    uids = [generator.insert(prompt, max_tokens=max_tokens) for prompt in prompts]
    tokens = {uid: [] for uid in uids}
    while len(generator):
        for uid, response in generator.step():
            tokens[uid].append(response.token)
    return [tokens[uid] for uid in uids]


def served(max_batch: int):
    """A run of `http_clients` against a fresh server whose engine has `max_batch` slots."""

    def run(model, tokenizer, prompts, max_tokens: int) -> list[tuple[str, int]]:
        from ..server.app import Server, create_app  # needs the server extra
        from ..server.engine import Engine
        from ..server.run import serve_in_thread

        engine = Engine(model, tokenizer, max_queue=len(prompts), max_batch=max_batch).start()
        port, stop = serve_in_thread(create_app(Server(engine, model_id="bench")))
        try:
            texts = [tokenizer.decode(prompt) for prompt in prompts]
            with ThreadPoolExecutor(len(prompts)) as clients:
                return list(clients.map(lambda text: complete(port, text, max_tokens), texts))
        finally:
            stop()
            engine.stop()

    return run


def complete(port: int, prompt: str, max_tokens: int) -> tuple[str, int]:
    """(text, tokens generated) of a greedy `/v1/completions` request."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    connection.request("POST", "/v1/completions", json.dumps(body).encode())
    reply = json.loads(connection.getresponse().read())
    connection.close()
    if "error" in reply:
        raise RuntimeError(f"the server refused the request: {reply['error']['message']}")
    return reply["choices"][0]["text"], reply["usage"]["completion_tokens"]


def timed(run, *args) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = run(*args)
    return time.perf_counter() - start, out


def bench_batch(args: argparse.Namespace) -> int:
    check_args(args)
    model, tokenizer = load(args.model, dtype=args.dtype)
    rng = np.random.default_rng(args.seed)
    vocab = model.config.text.vocab_size
    lengths = [args.prompt_tokens * (4 + i) // 4 for i in range(max(args.clients))]
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in lengths]
    batched(model, tokenizer, prompts[:2], 4)  # warm-up: compile, allocate
    if args.http:
        served(1)(model, tokenizer, prompts[:1], 2)  # and the server's imports, first request
    rows = []
    for clients in args.clients:
        progress(f"{clients} client(s), {args.tokens} tokens each")
        alone_run, together_run = (
            (served(1), served(clients)) if args.http else (one_at_a_time, batched)
        )
        alone_s, alone = timed(alone_run, model, tokenizer, prompts[:clients], args.tokens)
        together_s, together = timed(together_run, model, tokenizer, prompts[:clients], args.tokens)
        generated = sum(n for _, n in alone) if args.http else sum(map(len, alone))
        rows.append(
            (
                clients,
                f"{generated / alone_s:.1f}",
                f"{generated / together_s:.1f}",
                f"{alone_s / together_s:.2f}x",
                "yes" if together == alone else "NO",
            )
        )
    print_rows(
        ("clients", "one at a time tok/s", "batched tok/s", "batched / one at a time", "same"),
        rows,
    )
    return 0 if all(row[-1] == "yes" for row in rows) else 1
