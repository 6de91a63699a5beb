"""The tokenizer against transformers' Qwen3_5Tokenizer on the same files (the oracle).

Both read the tiny tokenizer of tokenizer_files.py, which carries the real Qwen3.5 pre-split
regex, special tokens and chat templates (the 4B/9B one thinks by default, the 0.8B/2B one not).
"""

import json
import unicodedata
from dataclasses import dataclass

import jinja2
import pytest

from qwen35_mlx.errors import CheckpointError
from qwen35_mlx.tokenizer import Tokenizer

from tokenizer_files import write_tokenizer_files

TEMPLATE_VARIANTS = pytest.mark.parametrize(
    "thinking_by_default", [True, False], ids=["4B-9B-template", "0.8B-2B-template"]
)


@dataclass
class Pair:
    ours: Tokenizer
    reference: object  # transformers' tokenizer loaded from the same folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[bool, Pair]:
    """Both template variants, keyed by thinking_by_default."""
    transformers = pytest.importorskip("transformers")
    loaded = {}
    for thinking_by_default in (True, False):
        directory = tmp_path_factory.mktemp(f"thinking_{thinking_by_default}")
        write_tokenizer_files(directory, thinking_by_default=thinking_by_default)
        reference = transformers.AutoTokenizer.from_pretrained(directory)
        loaded[thinking_by_default] = Pair(Tokenizer.from_pretrained(directory), reference)
    return loaded


# --- encode / decode ---------------------------------------------------------------------------

TEXTS = {
    "empty": "",
    "ascii": "Hello, the user said: 'it's fine' and they'll go.",
    "accents_nfc": "Crème brûlée à São Paulo, Ærøskøbing",
    "accents_nfd": "Cre\u0300me bru\u0302le\u0301e",  # NFC folds these into single code points
    "cjk": "你好，世界！日本語のテキスト。한국어 문장",
    "emoji": "🙂 👍🏽 👨‍👩‍👧 🇫🇷 ✅",
    "combining_marks": "नमस्ते दुनिया x\u0308y",  # \p{M} keeps marks inside the word
    "newlines": "line one\n\nline two\r\n  indented\n\n\n\tend  \n",
    "digits": "1234567 3.14159 -42 2e10 v0.8",
    "code": "def f(x):\n    return {'a': [1, 2]}  # ok?\n",
    "special_tokens": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "think_and_tools": "<think>\nplan\n</think>\n\n<tool_call>\n<function=f>\n</tool_call>",
    "vision_tokens": "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>caption",
    "lookalike_specials": "<|im_start |> <think > </ think>",
}


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_encode_matches_transformers(pairs, text):
    pair = pairs[True]
    assert pair.ours.encode(text) == pair.reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("skip_special_tokens", [False, True], ids=["keep_special", "skip_special"])
@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_decode_matches_transformers(pairs, text, skip_special_tokens):
    pair = pairs[True]
    ids = pair.ours.encode(text)
    expected = pair.reference.decode(ids, skip_special_tokens=skip_special_tokens)
    assert pair.ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_decode_inverts_encode_up_to_nfc(pairs, text):
    ours = pairs[True].ours
    assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)


def test_special_tokens_in_text_become_their_ids(pairs):
    ours = pairs[True].ours
    assert ours.encode("<|im_start|><think></think><|im_end|>") == [501, 507, 508, 502]


def test_skip_special_tokens_keeps_think_and_tool_tags(pairs):
    # The release flags <think>/<tool_call> as not special: they survive skip_special_tokens
    ours = pairs[True].ours
    ids = ours.encode("<|im_start|><think>a</think><tool_call><|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "<think>a</think><tool_call>"


# --- chat template -----------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville",  # non-ASCII: tojson must not escape it
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "single_user": ([{"role": "user", "content": "Hello!"}], None),
    "system_user": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        None,
    ),
    "multi_turn_reasoning": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6.", "reasoning_content": "Add again."},
            {"role": "user", "content": "Thanks!"},
        ],
        None,
    ),
    "reasoning_after_last_query": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two."},
        ],
        None,
    ),
    "reasoning_under_other_names": (
        [
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "content": "Hello.",
                "reasoning_content": None,
                "reasoning": "Greet back.",
            },
            {"role": "assistant", "content": "Anything else?", "thinking": "Offer help."},
        ],
        None,
    ),
    "tools": (
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Paris and Köln?"},
            {
                "role": "assistant",
                "content": None,  # OpenAI style: no text besides the calls
                "reasoning_content": "Two cities, two calls.",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    },
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"city": "Köln", "days": [1, 2]},
                        },
                    },
                ],
            },
            {"role": "tool", "content": '{"temp": 18}'},
            {"role": "tool", "content": '{"temp": 12}'},
        ],
        [WEATHER_TOOL],
    ),
    "tools_in_history": (
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "reasoning_content": "Dropped: before the last query.",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
                ],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny in Rome."},
            {"role": "user", "content": "Thanks"},
        ],
        [WEATHER_TOOL],
    ),
    "vision_items": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "Compare with"},
                    {"type": "video"},
                ],
            }
        ],
        None,
    ),
}
THINKING_SWITCH = pytest.mark.parametrize(
    "enable_thinking", [None, True, False], ids=["default", "on", "off"]
)


@TEMPLATE_VARIANTS
@THINKING_SWITCH
@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_template_matches_transformers(
    pairs, thinking_by_default, enable_thinking, conversation
):
    messages, tools = conversation
    pair = pairs[thinking_by_default]
    switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = pair.reference.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, **switch
    )
    assert (
        pair.ours.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking)
        == expected
    )


@TEMPLATE_VARIANTS
@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_template_without_generation_prompt(pairs, thinking_by_default, conversation):
    messages, tools = conversation
    pair = pairs[thinking_by_default]
    expected = pair.reference.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=False
    )
    assert (
        pair.ours.apply_chat_template(messages, tools=tools, add_generation_prompt=False)
        == expected
    )


def test_template_kwargs_reach_the_template(pairs):
    pair = pairs[True]
    messages = CONVERSATIONS["vision_items"][0]
    expected = pair.reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, add_vision_id=True
    )
    assert "Picture 1: " in expected
    assert pair.ours.apply_chat_template(messages, add_vision_id=True) == expected


@TEMPLATE_VARIANTS
def test_thinking_by_default(pairs, thinking_by_default):
    pair = pairs[thinking_by_default]
    prompt = pair.ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<think>\n" if thinking_by_default else "<think>\n\n</think>\n\n")


def test_template_errors_raise_template_error(pairs):
    with pytest.raises(jinja2.TemplateError, match="No user query found"):
        pairs[True].ours.apply_chat_template([{"role": "system", "content": "alone"}])


def test_jinja_environment_matches_transformers(pairs, tmp_path):
    # Exercises what the Qwen template doesn't: loop controls, tojson options, strftime_now.
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}[{{ m.content }}]{% endfor %}\n"
        "{{ tools | tojson(indent=2) }}\n"
        "{{ tools | tojson(sort_keys=true, separators=(',', ':')) }}\n"
        "{{ strftime_now('%Y') }} eos={{ eos_token }} pad={{ pad_token }}"
    )
    write_tokenizer_files(tmp_path, thinking_by_default=False)
    (tmp_path / "chat_template.jinja").write_text(template, encoding="utf-8")
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "<é>"},
        {"role": "user", "content": "x"},
    ]
    expected = pairs[True].reference.apply_chat_template(
        messages, tools=[WEATHER_TOOL], chat_template=template, tokenize=False
    )
    rendered = Tokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tools=[WEATHER_TOOL], add_generation_prompt=False
    )
    assert rendered == expected


def test_template_file_wins_over_config_field(tmp_path):
    write_tokenizer_files(tmp_path, thinking_by_default=False)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "chat_template": "from config"}), encoding="utf-8")
    messages = [{"role": "user", "content": "Hi"}]
    assert (
        Tokenizer.from_pretrained(tmp_path)
        .apply_chat_template(messages)
        .endswith("<think>\n\n</think>\n\n")
    )
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(messages) == "from config"


def test_no_chat_template(tmp_path):
    write_tokenizer_files(tmp_path, thinking_by_default=True)
    (tmp_path / "chat_template.jinja").unlink()
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])


# --- stop tokens, loading ----------------------------------------------------------------------


def test_eos_token_ids(pairs):
    pair = pairs[True]
    expected = {
        pair.reference.convert_tokens_to_ids(token) for token in ("<|im_end|>", "<|endoftext|>")
    }
    assert pair.ours.eos_token_ids == frozenset(expected) == {502, 500}
    assert pair.reference.eos_token_id in pair.ours.eos_token_ids


def test_fixture_ids_match_the_tiny_model_configs(pairs):
    # eos_token_id=500 and the vision ids 503..506 are baked into the tiny checkpoints' configs
    reference = pairs[True].reference
    names = [
        "<|endoftext|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    assert reference.convert_tokens_to_ids(names) == [500, 503, 504, 505, 506]
    assert max(reference.get_vocab().values()) < 512


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# --- streaming detokenizer ---------------------------------------------------------------------

STREAM_TEXTS = {
    "multibyte": "héllo 你好世界 🙂👍🏽 नमस्ते\nnext line ✅",
    "chat_markup": "<think>\n想一想 🤔\n</think>\n\nRéponse: 42 €<|im_end|>",
}


@pytest.mark.parametrize("text", STREAM_TEXTS.values(), ids=STREAM_TEXTS.keys())
def test_streaming_detokenizer_matches_full_decode(pairs, text):
    ours = pairs[True].ours
    ids = ours.encode(text)
    detokenizer = ours.detokenizer()
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    assert not any("\ufffd" in segment for segment in segments)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    assert "".join(segments) == ours.decode(ids)


def test_streaming_detokenizer_holds_partial_characters(pairs):
    ours = pairs[True].ours
    first, second, third = ours.encode("你")  # one byte per token: no merges cover it
    detokenizer = ours.detokenizer()
    detokenizer.add_token(first)
    detokenizer.add_token(second)
    assert detokenizer.last_segment == ""
    detokenizer.add_token(third)
    assert detokenizer.last_segment == "你"


def test_streaming_detokenizer_finalize_flushes_an_unfinished_character(pairs):
    ours = pairs[True].ours
    ids = ours.encode("a你")[:-1]
    detokenizer = ours.detokenizer()
    for token in ids:
        detokenizer.add_token(token)
    shown = detokenizer.last_segment
    assert shown == "a"
    detokenizer.finalize()
    assert shown + detokenizer.last_segment == ours.decode(ids) == "a\ufffd"


def test_streaming_detokenizer_passes_invalid_bytes_through(pairs):
    # Lone continuation bytes (a broken model) come out as U+FFFD, exactly as a full decode has them
    ours = pairs[True].ours
    continuation_byte = ours.encode("你")[1]
    ids = [continuation_byte] * 6 + ours.encode("ok")
    detokenizer = ours.detokenizer()
    for token in ids:
        detokenizer.add_token(token)
    assert detokenizer.last_segment == ours.decode(ids) == "\ufffd" * 6 + "ok"


def test_missing_tokenizer_json_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'tokenizer.json'} not found"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b'{"version": "1.0", "model": {"type": "BPE"'],
    ids=["empty", "no-model", "truncated"],
)
def test_unreadable_tokenizer_json(tmp_path, content):
    write_tokenizer_files(tmp_path, thinking_by_default=False)
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError) as raised:
        Tokenizer.from_pretrained(tmp_path)
    message = str(raised.value)
    assert f"{tmp_path / 'tokenizer.json'} cannot be read as a tokenizer" in message
    assert "Download it again" in message


@pytest.mark.parametrize(
    "content, problem",
    [("[]", "holds a JSON list, not an object"), ("{not json", "is not valid JSON")],
    ids=["list", "not-json"],
)
def test_unreadable_tokenizer_config(tmp_path, content, problem):
    write_tokenizer_files(tmp_path, thinking_by_default=False)
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=f"tokenizer_config.json:? {problem}"):
        Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_without_turn_end(tmp_path):
    # <|im_end|> as plain text is many byte tokens: a chat could never end its turns
    write_tokenizer_files(tmp_path, thinking_by_default=False)
    file = tmp_path / "tokenizer.json"
    fields = json.loads(file.read_text(encoding="utf-8"))
    fields["added_tokens"] = [t for t in fields["added_tokens"] if t["content"] != "<|im_end|>"]
    file.write_text(json.dumps(fields), encoding="utf-8")
    with pytest.raises(
        CheckpointError, match=f"{file} has no <\\|im_end\\|> token .* not a Qwen3.5 tokenizer"
    ):
        Tokenizer.from_pretrained(tmp_path)
