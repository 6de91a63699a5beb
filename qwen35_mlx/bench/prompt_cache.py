"""Warm turns with the prefix cache against reprocessing the history (what mlx-lm and most MLX
servers do for a hybrid model), measured in one run.

For each history length: a conversation whose first user message is a document of that many
tokens, one reply, and a new question. Without the cache, the next turn prefills the whole
history; with it (after the first turn filled it), only what follows the last cached prefix.
Time to first token of that next turn is timed for both, and the answers must agree.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..generate import stream_generate
from ..loading import load
from ..prompt_cache import PrefixCache
from .report import print_rows, progress

MIN_HISTORY = 16  # a document to cache, beyond the chat markup
WORDS = ("tide", "moon", "shore", "salt", "wave", "current", "reef", "harbour", "gull", "kelp")


def document(tokenizer, tokens: int, seed: int = 0) -> str:
    """Random words that encode to about `tokens` tokens."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=tokens)
    text = " ".join(words)
    while len(tokenizer.encode(text)) > tokens:
        text = text[: int(len(text) * 0.95)]
    return text


def first_token_seconds(model, tokenizer, messages, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    response = next(stream_generate(model, tokenizer, messages, max_tokens=1, **kwargs))
    return time.perf_counter() - start, response


def bench_prompt_cache(model_dir: str, histories: list[int], plot: str | None) -> list[dict]:
    if min(histories) < MIN_HISTORY:
        raise ValueError(
            f"--history lengths must be at least {MIN_HISTORY} tokens, got {min(histories)}"
        )
    model, tokenizer = load(model_dir)
    rows = []
    for tokens in histories:
        doc = document(tokenizer, tokens)
        first = [{"role": "user", "content": doc}]
        conversation = first + [
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Which word comes third?"},
        ]
        progress(f"{tokens} tokens: reprocessing the history")
        cold, plain = first_token_seconds(model, tokenizer, conversation)
        prefixes = PrefixCache(max_bytes=8 << 30)
        progress(f"{tokens} tokens: first turn, filling the prefix cache")
        first_token_seconds(model, tokenizer, first, prompt_cache=prefixes)
        progress(f"{tokens} tokens: warm turn")
        warm, cached = first_token_seconds(model, tokenizer, conversation, prompt_cache=prefixes)
        if cached.token != plain.token:
            raise RuntimeError("the cached turn's first token differs from the fresh one")
        rows.append(
            {
                "history": plain.prompt_tokens,
                "cached": cached.cached_tokens,
                "cold_s": cold,
                "warm_s": warm,
            }
        )
    print_rows(
        ("history tokens", "from cache", "no reuse s", "prefix cache s", "speed-up"),
        [
            [
                r["history"],
                r["cached"],
                f"{r['cold_s']:.3f}",
                f"{r['warm_s']:.3f}",
                f"{r['cold_s'] / r['warm_s']:.1f}x",
            ]
            for r in rows
        ],
    )
    if plot:
        draw_plot(rows, Path(plot))
        print(f"plot: {plot}")
    return rows


def draw_plot(rows: list[dict], file: Path, size: tuple[int, int] = (640, 400)) -> None:
    """Time to first token against history length, both ways, as a PNG (log-scaled time)."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs = [r["history"] for r in rows]
    times = [t for r in rows for t in (r["cold_s"], r["warm_s"])]
    low, high = np.log10(min(times)) - 0.1, np.log10(max(times)) + 0.1

    def point(x: float, seconds: float) -> tuple[float, float]:
        fx = (x - min(xs)) / max(max(xs) - min(xs), 1)
        fy = (np.log10(seconds) - low) / (high - low)
        return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for key, colour, label in (
        ("cold_s", "firebrick", "no reuse (whole history)"),
        ("warm_s", "seagreen", "prefix cache"),
    ):
        points = [point(r["history"], r[key]) for r in rows]
        draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((left + 10, top + 8 + 14 * (key == "warm_s")), label, fill=colour)
    for r in rows:
        x, _ = point(r["history"], r["cold_s"])
        draw.text((x - 15, height - bottom + 8), str(r["history"]), fill="black")
    for seconds in (10.0**e for e in range(int(np.floor(low)), int(np.ceil(high)) + 1)):
        _, y = point(xs[0], seconds)
        if top <= y <= height - bottom:
            draw.text((8, y - 6), f"{seconds:g} s", fill="black")
    draw.text(
        (left, height - 20), "history tokens -> time to first token of the next turn", fill="black"
    )
    image.save(file)
