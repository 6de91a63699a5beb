"""Generation speed and memory, qwen35_mlx against mlx-lm on the same checkpoint in one run.

`python -m benchmarks.generate --model DIR`: both libraries load DIR and greedily generate from
the same random token-id prompts, one after the other in this process (flags as
`qwen35-mlx bench generate`); the table gives ours/mlx-lm ratios.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx

from qwen35_mlx.bench import generate as generate_bench


def mlx_lm_library(path: str):
    import mlx_lm  # imported here: it pulls in transformers

    model, tokenizer = mlx_lm.load(path)

    def stream(ids: list[int], max_tokens: int, prefill_step_size: int):
        # no sampler: mlx-lm decodes greedily (argmax), as stream_generate with temp 0 does
        return mlx_lm.stream_generate(
            model,
            tokenizer,
            mx.array(ids),
            max_tokens=max_tokens,
            prefill_step_size=prefill_step_size,
        )

    return stream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__)
    generate_bench.add_args(parser)
    libraries = {**generate_bench.LIBRARIES, "mlx-lm": mlx_lm_library}
    return generate_bench.bench_generate(parser.parse_args(argv), libraries)


if __name__ == "__main__":
    sys.exit(main())
