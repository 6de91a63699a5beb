"""A tiny Qwen3.5 tokenizer in the real Hugging Face layout, for 512-token test models.

Files written, as a released checkpoint ships them:
  tokenizer.json         byte-level BPE with the Qwen3.5 normalizer (NFC) and pre-split regex,
                         256 byte tokens, a handful of merges, the Qwen special tokens at 496..508.
  tokenizer_config.json  shaped like the release's: eos <|im_end|>, pad <|endoftext|>, no BOS,
                         model_max_length 262144, added_tokens_decoder, vision token names.
  chat_template.jinja    the real Qwen3.5 chat template, one of the two copies in tests/data/.

The templates in tests/data/ are byte-identical to the released ones:
  qwen3_5_chat_template_thinking.jinja (4B/9B, thinking by default) is ggml-org llama.cpp's
    `models/templates/Qwen3.5-4B.jinja`, read from the HermestoAizales/llama.cpp mirror (commit
    0834e658). Its MD5 94f89e03284d911fc65d06422439fd79 is the one a public manifest records for
    https://huggingface.co/Qwen/Qwen3.5-9B/raw/main/chat_template.jinja.
  qwen3_5_chat_template_nonthinking.jinja (0.8B/2B, non-thinking by default) is that file with the
    generation-prompt guard `enable_thinking is defined and enable_thinking is false` changed to
    `... is true` and its two branches swapped. Its MD5 3dd635d8e716410fb409839dfac61ea9 is the
    manifest's for Qwen/Qwen3.5-0.8B.

One deliberate departure: the release's tokenizer_config.json says "Qwen2Tokenizer", which makes
transformers 5.23 rebuild the pre-tokenizer with the older Qwen2 regex (no \\p{M}), splitting
combining marks unlike the release's own tokenizer.json. We name "Qwen3_5Tokenizer" (the class
transformers maps model_type qwen3_5 to), whose pipeline equals tokenizer.json, so that
transformers can serve as the oracle.
"""

import json
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

DATA_DIR = Path(__file__).parent / "data"
THINKING_TEMPLATE = DATA_DIR / "qwen3_5_chat_template_thinking.jinja"
NON_THINKING_TEMPLATE = DATA_DIR / "qwen3_5_chat_template_nonthinking.jinja"

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, id, special): the release's flags, at small ids. <|endoftext|> = 500 is the tiny model
# configs' eos_token_id; the vision ids match the vision fixtures. The release marks the tool and
# think tags as not special, so decode(skip_special_tokens=True) keeps them.
SPECIAL_TOKENS = [
    ("<tool_call>", 496, False),
    ("</tool_call>", 497, False),
    ("<tool_response>", 498, False),
    ("</tool_response>", 499, False),
    ("<|endoftext|>", 500, True),
    ("<|im_start|>", 501, True),
    ("<|im_end|>", 502, True),
    ("<|vision_start|>", 503, True),
    ("<|vision_end|>", 504, True),
    ("<|image_pad|>", 505, True),
    ("<|video_pad|>", 506, True),
    ("<think>", 507, False),
    ("</think>", 508, False),
]

# Byte-level symbols (Ġ = space, Ċ = newline); enough to see merges fire on English and chat markup.
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in the order byte-level vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    return dict(zip(printable + shifted, chars, strict=True))


def _vocab() -> dict[str, int]:
    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode().values())}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    # Specials sit in the model vocab too, so as added tokens they keep these ids
    vocab.update({content: token_id for content, token_id, _ in SPECIAL_TOKENS})
    return vocab


def _tokenizer_json() -> Tokenizer:
    tokenizer = Tokenizer(
        BPE(vocab=_vocab(), merges=MERGES, unk_token=None, fuse_unk=False, byte_fallback=False)
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
            for content, _, special in SPECIAL_TOKENS
        ]
    )
    return tokenizer


def _tokenizer_config() -> dict:
    added_tokens_decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, token_id, special in SPECIAL_TOKENS
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
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
        "tokenizer_class": "Qwen3_5Tokenizer",
        "unk_token": None,
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    }


def write_tokenizer_files(directory: Path, *, thinking_by_default: bool) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `directory`.

    Args:
        directory: checkpoint folder (created if missing).
        thinking_by_default: True for the 4B/9B template (opens `<think>` unless
            enable_thinking=False), False for the 0.8B/2B one (closes an empty think block
            unless enable_thinking=True).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _tokenizer_json().save(str(directory / "tokenizer.json"))
    config_text = json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False)
    (directory / "tokenizer_config.json").write_text(config_text + "\n", encoding="utf-8")
    template = THINKING_TEMPLATE if thinking_by_default else NON_THINKING_TEMPLATE
    (directory / "chat_template.jinja").write_bytes(template.read_bytes())
