"""Qwen3.5 tokenizer: byte-level BPE from a checkpoint's tokenizer.json, plus its chat template.

Encoding and decoding run on the `tokenizers` library (the Rust BPE that transformers wraps),
reading the checkpoint's own pipeline (NFC, the Qwen3.5 pre-split regex, byte-level BPE). Chat
templates render in a jinja2 sandbox set up like transformers' (`utils/chat_template_utils.py`,
5.23), so a prompt equals `AutoTokenizer.apply_chat_template(..., tokenize=False)` without
importing transformers or running checkpoint code. docs/ARCHITECTURE.md §5 lists the tokens and the
template's logic.
"""

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cache, cached_property
from pathlib import Path

import tokenizers

from .errors import CheckpointError, MissingFileError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Turn end and document end: generation stops at either (generation_config's eos ids).
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
TURN_END = STOP_TOKENS[0]  # one token: chat sessions append it after each reply
# Names a message's reasoning arrives under; the first is the one chat templates read.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive, without ever splitting a UTF-8 character.

    Written here rather than reusing mlx-lm's: its BPE detokenizer needs a transformers
    tokenizer and drops the first segment's leading space, and its naive one re-decodes the
    whole current line.

    Each step decodes only the tokens not yet emitted. Byte-level BPE decodes a sequence to its
    parts' texts joined, as long as the parts split at character boundaries, so earlier tokens
    are not needed as context. While that text ends in U+FFFD (an incomplete character) the
    tokens are held; only a run of invalid bytes (a broken model) can make the window long.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.tokens: list[int] = []
        self._read_offset = 0  # tokens before this one have been emitted
        self._unread: list[str] = []

    def add_token(self, token: int) -> None:
        """Append one generated id; its text becomes readable once its characters are complete."""
        self.tokens.append(token)
        self._emit(force=False)

    def finalize(self) -> None:
        """Emit everything held back (an unfinished character becomes U+FFFD, as a full decode
        has it)."""
        self._emit(force=True)

    @property
    def last_segment(self) -> str:
        """Text emitted since the previous read of this property."""
        segment = "".join(self._unread)
        self._unread.clear()
        return segment

    def _emit(self, force: bool) -> None:
        held = self.tokens[self._read_offset :]
        if not held:
            return
        piece = self._decode(held)
        if piece.endswith("\ufffd") and not force:
            return
        self._unread.append(piece)
        self._read_offset = len(self.tokens)


class Tokenizer:
    """A checkpoint's tokenizer and chat template; build it with `Tokenizer.from_pretrained`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ):
        """
        Args:
            backend: the `tokenizers.Tokenizer` loaded from tokenizer.json.
            chat_template: Jinja source of the chat template, if the checkpoint has one.
            special_tokens: tokenizer_config's named tokens (eos_token, pad_token, ...); chat
                templates see them as variables, as in transformers.
        """
        self._backend = backend
        self._special_tokens = dict(special_tokens or {})
        self._template = _jinja_environment().from_string(chat_template) if chat_template else None
        # A multimodal checkpoint's image and video processor (`qwen35_mlx.processor`), attached
        # by `qwen35_mlx.load` as a Hugging Face processor wraps its tokenizer; None for text.
        self.processor = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load from a checkpoint folder: tokenizer.json (required), tokenizer_config.json and
        chat_template.jinja (optional; the .jinja file wins over the config's `chat_template`).

        Raises:
            MissingFileError (a CheckpointError and FileNotFoundError): no tokenizer.json.
            CheckpointError: a file that cannot be read, or a tokenizer without `<|im_end|>`.
        """
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise MissingFileError(
                f"{tokenizer_file} not found: a checkpoint needs the tokenizer.json of its "
                f"Hugging Face repository. Download it next to config.json, e.g. "
                f"`hf download <repo> {TOKENIZER_FILE} --local-dir {path}`."
            )
        config = _read_config(path / CONFIG_FILE)
        backend = _read_backend(tokenizer_file)
        return cls(
            backend,
            chat_template=_read_chat_template(path, config),
            special_tokens=_named_special_tokens(config),
        )

    def vocabulary(self) -> dict[str, int]:
        """Every token and its id, special tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer as tokenizer.json text (what grammar libraries read)."""
        return self._backend.to_str()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. No BOS is added (Qwen has none); special tokens written in the
        text, such as `<|im_start|>`, become their ids."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. With `skip_special_tokens`, tokens flagged special are dropped
        (Qwen3.5 flags `<|im_end|>` and the vision tokens, not `<think>` or `<tool_call>`)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping] | None = None,
        **template_kwargs,
    ) -> str:
        """Render a conversation into prompt text with the checkpoint's chat template.

        Args:
            messages: dicts with `role` and `content` (a string, or a list of text/image/video
                items), optionally `reasoning_content` and `tool_calls`. None-valued keys count
                as absent.
            add_generation_prompt: end with the assistant turn's opening, ready for generation.
            enable_thinking: True opens a `<think>` block, False closes an empty one; None leaves
                it to the template (0.8B/2B: non-thinking, 4B/9B: thinking).
            tools: JSON-schema tool definitions, rendered into the system turn.
            **template_kwargs: further template variables, e.g. `add_vision_id=True`.

        Returns:
            The prompt text; encode it with `encode`.
        """
        if self._template is None:
            raise ValueError(
                "This checkpoint has no chat template: add its chat_template.jinja to the "
                "folder, or encode a prompt you format yourself."
            )
        if enable_thinking is not None:
            template_kwargs["enable_thinking"] = enable_thinking
        return self._template.render(
            messages=[_template_message(message) for message in messages],
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self._special_tokens, **template_kwargs},
        )

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: `<|im_end|>`, `<|endoftext|>` and the config's eos_token."""
        names = {*STOP_TOKENS, self._special_tokens.get("eos_token")}
        ids = (self._backend.token_to_id(name) for name in names if name)
        return frozenset(token_id for token_id in ids if token_id is not None)

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (special tokens kept, so `<think>` shows in the text)."""
        return StreamingDetokenizer(
            lambda ids: self._backend.decode(ids, skip_special_tokens=False)
        )


@cache
def _jinja_environment():
    """The sandbox transformers renders chat templates in (minus its `{% generation %}` tag)."""
    # imported here, when a chat template is compiled: jinja2 costs ~0.1 s at start-up
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: Jinja's own escapes HTML characters, which would change the prompt
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _template_message(message: Mapping) -> dict:
    """The message as transformers hands it to templates: None-valued keys dropped, and reasoning
    given as `thinking` or `reasoning` also exposed as `reasoning_content`."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _read_config(file: Path) -> dict:
    """tokenizer_config.json as a dict; {} when the checkpoint has none."""
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:  # not JSON, or not UTF-8
        raise CheckpointError(
            f"{file} is not valid JSON ({error}); download it again from the checkpoint's "
            "repository"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{file}: holds a JSON {type(config).__name__}, not an object of settings; "
            "download it again from the checkpoint's repository"
        )
    return config


def _read_backend(file: Path) -> tokenizers.Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception ("Model missing." etc.)
        raise CheckpointError(
            f"{file} cannot be read as a tokenizer ({error}); it is empty, truncated or not a "
            "Hugging Face tokenizers file. Download it again from the checkpoint's repository"
        ) from None
    _check_turn_end(backend, file)
    return backend


def _check_turn_end(backend: tokenizers.Tokenizer, file: Path) -> None:
    if len(backend.encode(TURN_END, add_special_tokens=False).ids) != 1:
        raise CheckpointError(
            f"{file} has no {TURN_END} token (the end of a chat turn, where generation stops): "
            "it is not a Qwen3.5 tokenizer. Use the tokenizer.json of the checkpoint's own "
            "repository"
        )


def _read_chat_template(path: Path, config: Mapping) -> str | None:
    template_file = path / TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(
            f"{path / CONFIG_FILE}: `chat_template` holds named templates, which are not "
            f"supported; save the one to use as {TEMPLATE_FILE}."
        )
    return template


def _named_special_tokens(config: Mapping) -> dict[str, str]:
    """tokenizer_config's `*_token` entries as strings (older configs store AddedToken dicts)."""
    tokens = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            value = value.get("content")
        if key.endswith("_token") and isinstance(value, str):
            tokens[key] = value
    return tokens
