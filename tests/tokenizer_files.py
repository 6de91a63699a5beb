"""A tiny Qwen3.5 tokenizer in the real Hugging Face layout, for 512-token test models.

The files are written by the package's one writer, `qwen35_mlx.bench.tokenizer_files` (the
released format and chat templates), with the special tokens moved to small ids and a handful of
merges, so that 512-token models can emit every one of them.

One deliberate departure: the release's tokenizer_config.json says "Qwen2Tokenizer", which makes
transformers 5.23 rebuild the pre-tokenizer with the older Qwen2 regex (no \\p{M}), splitting
combining marks unlike the release's own tokenizer.json. We name "Qwen3_5Tokenizer" (the class
transformers maps model_type qwen3_5 to), whose pipeline equals tokenizer.json, so that
transformers can serve as the oracle.
"""

from pathlib import Path

from qwen35_mlx.bench import tokenizer_files

# id: (content, special), the release's flags at small ids. <|endoftext|> = 500 is the tiny model
# configs' eos_token_id; the vision ids match the vision fixtures.
SPECIAL_TOKENS = {
    496: ("<tool_call>", False),
    497: ("</tool_call>", False),
    498: ("<tool_response>", False),
    499: ("</tool_response>", False),
    500: ("<|endoftext|>", True),
    501: ("<|im_start|>", True),
    502: ("<|im_end|>", True),
    503: ("<|vision_start|>", True),
    504: ("<|vision_end|>", True),
    505: ("<|image_pad|>", True),
    506: ("<|video_pad|>", True),
    507: ("<think>", False),
    508: ("</think>", False),
}

# Byte-level symbols (Ġ = space, Ċ = newline): enough to see merges fire on English and chat
# markup.
MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ċ", "Ċ"),
    ("u", "s"),
    ("us", "er"),
]


def write_tokenizer_files(directory: Path, *, thinking_by_default: bool) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `directory`.

    Args:
        directory: checkpoint folder (created if missing).
        thinking_by_default: True for the 4B/9B template, False for the 0.8B/2B one.
    """
    tokenizer_files.write_tokenizer_files(
        directory,
        thinking_by_default=thinking_by_default,
        special_tokens=SPECIAL_TOKENS,
        merges=MERGES,
        dense=False,
        tokenizer_class="Qwen3_5Tokenizer",
    )
