"""Qwen3.5 tokenizer files in the released Hugging Face format, for checkpoints without a release.

`write_tokenizer_files` writes what a released checkpoint ships next to its weights:
  tokenizer.json         byte-level BPE with the Qwen3.5 normalizer (NFC) and pre-split regex,
                         the 256 byte tokens, optional merges and the special tokens.
  tokenizer_config.json  shaped like the release's: eos <|im_end|>, pad <|endoftext|>, no BOS,
                         model_max_length 262144, added_tokens_decoder, vision token names.
  chat_template.jinja    the released Qwen3.5 chat template (one of the two in templates/).

Random-weight checkpoints (`random_checkpoint.py`) take the special tokens at their released ids
and a dense vocabulary, so every id a random model emits decodes; the tests' tiny models put them
at small ids (tests/tokenizer_files.py).

The templates in templates/ are byte-identical to the released ones:
  qwen3_5_chat_template_thinking.jinja (4B/9B, thinking by default) is ggml-org llama.cpp's
    `models/templates/Qwen3.5-4B.jinja`, read from the HermestoAizales/llama.cpp mirror (commit
    0834e658). Its MD5 94f89e03284d911fc65d06422439fd79 is the one a public manifest records for
    https://huggingface.co/Qwen/Qwen3.5-9B/raw/main/chat_template.jinja.
  qwen3_5_chat_template_nonthinking.jinja (0.8B/2B, non-thinking by default) is that file with the
    generation-prompt guard `enable_thinking is defined and enable_thinking is false` changed to
    `... is true` and its two branches swapped. Its MD5 3dd635d8e716410fb409839dfac61ea9 is the
    manifest's for Qwen/Qwen3.5-0.8B.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

TEMPLATES = Path(__file__).parent / "templates"
THINKING_TEMPLATE = TEMPLATES / "qwen3_5_chat_template_thinking.jinja"
NON_THINKING_TEMPLATE = TEMPLATES / "qwen3_5_chat_template_nonthinking.jinja"

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# id: (content, special) at their released ids (docs/ARCHITECTURE.md §5); the audio tokens are left
# out. The release marks the tool and think tags as not special, so
# decode(skip_special_tokens=True) keeps them.
SPECIAL_TOKENS = {
    248044: ("<|endoftext|>", True),
    248045: ("<|im_start|>", True),
    248046: ("<|im_end|>", True),
    248047: ("<|object_ref_start|>", True),
    248048: ("<|object_ref_end|>", True),
    248049: ("<|box_start|>", True),
    248050: ("<|box_end|>", True),
    248051: ("<|quad_start|>", True),
    248052: ("<|quad_end|>", True),
    248053: ("<|vision_start|>", True),
    248054: ("<|vision_end|>", True),
    248055: ("<|vision_pad|>", True),
    248056: ("<|image_pad|>", True),
    248057: ("<|video_pad|>", True),
    248058: ("<tool_call>", False),
    248059: ("</tool_call>", False),
    248060: ("<|fim_prefix|>", False),
    248061: ("<|fim_middle|>", False),
    248062: ("<|fim_suffix|>", False),
    248063: ("<|fim_pad|>", False),
    248064: ("<|repo_name|>", False),
    248065: ("<|file_sep|>", False),
    248066: ("<tool_response>", False),
    248067: ("</tool_response>", False),
    248068: ("<think>", False),
    248069: ("</think>", False),
}
# What the release's tokenizer_config.json names its tokenizer class.
RELEASED_TOKENIZER_CLASS = "Qwen2Tokenizer"


def write_tokenizer_files(
    directory: str | Path,
    *,
    thinking_by_default: bool,
    special_tokens: Mapping[int, tuple[str, bool]] = SPECIAL_TOKENS,
    merges: Sequence[tuple[str, str]] = (),
    dense: bool = True,
    tokenizer_class: str = RELEASED_TOKENIZER_CLASS,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `directory`.

    Args:
        directory: checkpoint folder (created if missing).
        thinking_by_default: True for the 4B/9B template (opens `<think>` unless
            enable_thinking=False), False for the 0.8B/2B one (closes an empty think block
            unless enable_thinking=True).
        special_tokens: id -> (content, special); the released ids by default.
        merges: BPE merges of byte-level symbols (Ġ = space, Ċ = newline); their tokens take
            the ids after the 256 byte tokens.
        dense: give every id below the first special token a token, so that detokenizers that
            index a dense table (mlx-lm's) accept any id a random model emits.
        tokenizer_class: tokenizer_config's `tokenizer_class`; the release's by default.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(special_tokens, merges, dense)
    _tokenizer_json(vocab, merges, special_tokens).save(str(directory / "tokenizer.json"))
    config = json.dumps(
        _tokenizer_config(special_tokens, tokenizer_class), indent=2, ensure_ascii=False
    )
    (directory / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    template = THINKING_TEMPLATE if thinking_by_default else NON_THINKING_TEMPLATE
    (directory / "chat_template.jinja").write_bytes(template.read_bytes())


def _byte_symbols() -> tuple[list[str], list[str]]:
    """GPT-2's byte -> printable character table: (indexed by byte, in vocabulary order)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    table = dict(
        zip(
            printable + shifted,
            [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))],
        )
    )
    return [table[b] for b in range(256)], [table[b] for b in printable + shifted]


def _vocab(
    special_tokens: Mapping[int, tuple[str, bool]], merges: Sequence[tuple[str, str]], dense: bool
) -> dict[str, int]:
    by_byte, ordered = _byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(ordered)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    if dense:
        # Filler ids spell the 2 or 3 bytes of their own number: unique, decodable, never
        # produced by encoding (no merge builds them).
        for i in range(len(vocab), min(special_tokens)):
            filler = "".join(by_byte[b] for b in i.to_bytes(2 if i < 65536 else 3, "big"))
            if filler in vocab:
                raise ValueError(f"filler token {filler!r} for id {i} is already a merge")
            vocab[filler] = i
    # Specials sit in the model vocab too, so as added tokens they keep these ids.
    vocab.update({content: i for i, (content, _) in special_tokens.items()})
    return vocab


def _tokenizer_json(
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    special_tokens: Mapping[int, tuple[str, bool]],
) -> Tokenizer:
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=list(merges), unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [
            AddedToken(content, special=special, normalized=False)
            for content, special in special_tokens.values()
        ]
    )
    return tokenizer


def _tokenizer_config(special_tokens: Mapping[int, tuple[str, bool]], tokenizer_class: str) -> dict:
    decoder = {
        str(i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in special_tokens.items()
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "backend": "tokenizers",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "image_token": "<|image_pad|>",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "pretokenize_regex": PRETOKENIZE_REGEX,
        "split_special_tokens": False,
        "tokenizer_class": tokenizer_class,
        "unk_token": None,
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    }
