"""Constrained decoding per token: llguidance (ours) against xgrammar and outlines-core, in one run.

`python -m benchmarks.constrained --model DIR`: the run of `qwen35-mlx bench constrained` with
the two other libraries decoding the same reply through the same processor (each fills the
same 32-bit bitmask layout), configured alike: compact JSON, no whitespace between tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from qwen35_mlx.bench import constrained as constrained_bench
from qwen35_mlx.bench.tokenizer_files import _byte_symbols
from qwen35_mlx.constrained import END_OF_TURN, GrammarProcessor


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Every id's token as tokenizer.json spells it (byte-level symbols); "" for unused ids."""
    strings = [""] * vocab_size
    for token, i in tokenizer.vocabulary().items():
        strings[i] = token
    return strings


def xgrammar_library(tokenizer, vocab_size: int):
    import xgrammar as xgr  # imported here: optional, and it pulls in torch

    (end,) = tokenizer.encode(END_OF_TURN)
    start = time.perf_counter()
    info = xgr.TokenizerInfo(
        token_strings(tokenizer, vocab_size),
        xgr.VocabType.BYTE_LEVEL,
        vocab_size=vocab_size,
        stop_token_ids=[end],
    )
    compiler = xgr.GrammarCompiler(info)
    prepared = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(constrained_bench.SCHEMA), any_whitespace=False, separators=(",", ":")
    )

    class Processor(GrammarProcessor):
        def accept(self, token: int) -> None:
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"xgrammar refused token {token}")

        def fill(self, bitmask: np.ndarray) -> None:
            self.matcher.fill_next_token_bitmask(self.torch_bitmask)
            bitmask[:] = self.torch_bitmask.numpy()

    def processor():
        made = Processor(xgr.GrammarMatcher(compiled), vocab_size, tokenizer.eos_token_ids)
        made.torch_bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        return made

    return processor, prepared - start, time.perf_counter() - prepared


def outlines_core_library(tokenizer, vocab_size: int):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    (end,) = tokenizer.encode(END_OF_TURN)
    by_byte, _ = _byte_symbols()
    to_byte = {symbol: b for b, symbol in enumerate(by_byte)}
    start = time.perf_counter()
    tokens: dict[bytes, list[int]] = {}
    for i, token in enumerate(token_strings(tokenizer, vocab_size)):
        if token and i != end:  # byte-level symbols -> bytes; added tokens are plain text
            raw = (
                bytes(to_byte[c] for c in token)
                if all(c in to_byte for c in token)
                else token.encode()
            )
            tokens.setdefault(raw, []).append(i)
    vocabulary = Vocabulary(end, tokens)
    prepared = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(constrained_bench.SCHEMA), whitespace_pattern="")
    index = Index(regex, vocabulary)

    class Processor(GrammarProcessor):
        def accept(self, token: int) -> None:
            self.matcher.advance(token)

        def fill(self, bitmask: np.ndarray) -> None:
            self.matcher.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    def processor():
        return Processor(Guide(index), vocab_size, tokenizer.eos_token_ids)

    return processor, prepared - start, time.perf_counter() - prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.constrained", description=__doc__)
    constrained_bench.add_args(parser)
    libraries = {
        **constrained_bench.LIBRARIES,
        "xgrammar": xgrammar_library,
        "outlines-core": outlines_core_library,
    }
    return constrained_bench.bench_constrained(parser.parse_args(argv), libraries)


if __name__ == "__main__":
    sys.exit(main())
