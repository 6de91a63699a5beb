"""What constrained decoding costs per token, against unconstrained decoding in the same run.

Each library decodes the same reply: a fixed JSON document of `SCHEMA` (compact, as the
grammar writes it) then `<|im_end|>`, each token forced by the sampler after the mask was
computed and applied, as `generate_step` runs a logits processor (docs/ARCHITECTURE.md §14).
A forced token the mask refuses is an error, so the run also checks each library's mask.
Rounds alternate the libraries; the table gives, as medians: the time to prepare the
tokenizer and to compile the schema, the mask's own cost per token (computed, applied and the
token fed, without the model), and decoding's per-token time with its ratio to unconstrained
decoding.
`python -m benchmarks.constrained` adds xgrammar and outlines-core to the race.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import mlx.core as mx

from ..constrained import END_OF_TURN, grammar_tokenizer, json_schema_grammar
from ..generate import generate_step
from ..loading import load
from .report import print_rows, progress

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "tags": ["mathematics", "engines", "poetry"],
    "address": {"city": "London", "zip": "W1J 7NT"},
    "active": True,
}
# name -> make(tokenizer, vocab_size) -> (processor factory, tokenizer seconds, compile seconds)
Library = Callable[..., tuple[Callable[[], Callable], float, float]]


def llguidance_library(tokenizer, vocab_size: int):
    start = time.perf_counter()
    grammar_tokenizer(tokenizer, vocab_size)
    prepared = time.perf_counter()
    grammar = json_schema_grammar(SCHEMA)

    def processor():
        return grammar.processor(tokenizer, vocab_size)

    processor()  # the matcher is built per reply; count its first build as compiling
    return processor, prepared - start, time.perf_counter() - prepared


LIBRARIES: dict[str, Library] = {"llguidance": llguidance_library}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--rounds", type=int, default=3, help="timed replies per library")


def bench_constrained(args: argparse.Namespace, libraries: dict[str, Library] = LIBRARIES):
    progress(f"loading {args.model}")
    model, tokenizer = load(args.model)
    vocab = model.config.text.vocab_size
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "Describe Ada as JSON."}])
    )
    reply = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":"))) + tokenizer.encode(
        END_OF_TURN
    )
    processors = {"unconstrained": None}
    setup = {"unconstrained": ("", "")}
    for name, make in libraries.items():
        progress(f"{name}: preparing the tokenizer and compiling the schema")
        processors[name], prepared, compiled = make(tokenizer, vocab)
        setup[name] = (f"{prepared:.2f}", f"{compiled * 1e3:.1f}")
    decoding = {name: [] for name in processors}
    masking = {name: [] for name in processors}
    decode_reply(model, prompt, reply, None)  # warm-up
    for round_ in range(args.rounds):
        progress(f"round {round_ + 1}/{args.rounds}: {len(reply)} tokens per library")
        for name, make in processors.items():
            decoding[name].append(decode_reply(model, prompt, reply, make and make()))
            masking[name].append(mask_seconds(reply, make(), vocab) if make else 0.0)
    base = statistics.median(decoding["unconstrained"])
    rows = []
    for name in processors:
        mask, total = statistics.median(masking[name]), statistics.median(decoding[name])
        rows.append(
            (name, *setup[name], f"{mask * 1e3:.3f}", f"{total * 1e3:.2f}", f"{total / base:.3f}")
        )
    print(f"vocabulary {vocab}, reply of {len(reply)} tokens, median of {args.rounds} rounds")
    columns = ["library", "tokenizer s", "compile ms", "mask ms/token", "ms/token", "ratio"]
    print_rows(columns, rows)
    return 0


def decode_reply(model, prompt: list[int], reply: list[int], processor) -> float:
    """Seconds per token to decode `reply` after `prompt`, each token forced by the sampler
    after `processor` (if any) masked the logits; ValueError if the mask refused one."""
    forced = iter(reply)
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=len(reply),
        sampler=lambda logprobs: mx.array([next(forced)]),
        logits_processors=[] if processor is None else [processor],
    )
    start = time.perf_counter()
    for n, (token, logprobs) in enumerate(steps):
        if n == 0:  # the prompt's pass is not timed
            start = time.perf_counter()
        if logprobs[token].item() == float("-inf"):
            raise ValueError(f"the grammar refused token {n} ({token}) of a valid reply")
    return (time.perf_counter() - start) / (len(reply) - 1)


def mask_seconds(reply: list[int], processor, vocab_size: int) -> float:
    """Seconds per token the processor alone takes (mask computed and applied, token fed)
    along `reply`, without the model."""
    logits = mx.zeros((1, vocab_size))
    start = time.perf_counter()
    for n in range(len(reply)):
        mx.eval(processor(reply[:n], logits))
    return (time.perf_counter() - start) / len(reply)
