"""Constrained decoding: replies that follow a JSON schema or Qwen3.5's tool-call format.

The grammars come from llguidance (docs/ARCHITECTURE.md §14): JSON from its JSON-schema
compiler, the tool-call wrapper from a small grammar in its Lark dialect that embeds the
parameters' schemas with `%json`. A `Grammar` holds the compiled-from text; `processor` turns it
into a logits processor for `generate_step` that adds, each step, a bias of 0 (allowed) or -inf
(refused) over the vocabulary. When the value is complete only `<|im_end|>` is allowed, so the
reply ends right after it.

- Whitespace is bounded: the JSON has no whitespace outside strings (compact separators), so a
  model cannot pad a reply with blanks until max_tokens.
- Thinking: a reply that starts inside `<think>` reasons freely (only the end-of-turn tokens are
  refused, so the answer cannot be skipped); the grammar applies from the token after `</think>`.
- A value that has not closed by max_tokens ends the reply with finish_reason "length", cut off
  where it stands.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .tokenizer import THINK_CLOSE

EXTRA = "server"  # the optional extra that installs llguidance
# No whitespace outside strings: with the library's default (any run of blanks between tokens)
# a random-weight model emits blanks until max_tokens (docs/ARCHITECTURE.md §14).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
END_OF_TURN = "<|im_end|>"
# [256, 8] the biases of the 8 tokens a bitmask byte covers (bit i: token 8 byte + i):
# 0 allowed, -inf refused. A table lookup is ten times faster than unpacking the bits.
_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
BYTE_BIAS = np.where(_BITS.astype(bool), np.float32(0), np.float32(-np.inf))


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError as error:
        raise ImportError(
            "constrained decoding (response_format, tool_choice required or a named function) "
            f'needs llguidance: pip install "qwen35-mlx[{EXTRA}]"'
        ) from error
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (its serialized form) and what it constrains, for messages."""

    source: str
    what: str

    def processor(self, tokenizer, vocab_size: int, *, thinking: bool = False) -> GrammarProcessor:
        """A logits processor that keeps the reply inside this grammar.

        Args:
            tokenizer: the checkpoint's `Tokenizer`.
            vocab_size: the model's vocabulary (logits width; may exceed the tokenizer's).
            thinking: the reply starts inside an open `<think>` block: free until `</think>`.
        """
        llg = _llguidance()
        matcher = llg.LLMatcher(grammar_tokenizer(tokenizer, vocab_size), self.source)
        if matcher.is_error():
            raise ValueError(f"{self.what}: {matcher.get_error()}")
        (think_end,) = tokenizer.encode(THINK_CLOSE) if thinking else (None,)  # one token
        return GrammarProcessor(matcher, vocab_size, tokenizer.eos_token_ids, think_end)


class GrammarProcessor:
    """f(generated ids, logits [1, V]) -> logits with the tokens the grammar refuses at -inf.

    Each call feeds the matcher the tokens generated since the last one, then fills the next
    bitmask on the CPU while the model's forward pass for these logits runs (started with
    async_eval), and applies it as one addition of a 0/-inf bias.
    """

    def __init__(self, matcher, vocab_size: int, stop_ids, think_end: int | None = None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.bitmask = np.full((1, (vocab_size + 31) // 32), -1, np.int32)  # [1, V/32] bits
        self.seen = 0  # generated tokens already fed to the matcher
        self.think_end = think_end  # None once the reasoning is over (or there is none)
        self.no_stop = np.zeros(vocab_size, np.float32)  # [V] the bias while reasoning
        self.no_stop[sorted(stop_ids)] = -np.inf

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        if len(generated) < self.seen:
            raise ValueError("a grammar processor follows one reply; make a new one per reply")
        mx.async_eval(logits)  # the forward pass runs while the mask is computed
        for token in generated[self.seen :]:
            if self.think_end is None:
                self.accept(token)
            elif token == self.think_end:  # the grammar starts after </think>
                self.think_end = None
        self.seen = len(generated)
        if self.think_end is not None:
            return logits + mx.array(self.no_stop, logits.dtype)
        self.fill(self.bitmask)
        # each bitmask byte looks up its 8 tokens' biases: [V/8, 8] -> [V]
        bias = np.take(BYTE_BIAS, self.bitmask.view(np.uint8)[0], axis=0).reshape(-1)
        return logits + mx.array(bias[: self.vocab_size], logits.dtype)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    def fill(self, bitmask: np.ndarray) -> None:
        """Write the allowed tokens' bits into bitmask [1, V/32] (bit i of word w: token
        32 w + i)."""
        _llguidance().numpy.fill_next_token_bitmask(self.matcher, bitmask)


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` (every token's bytes; about 3 s to build for the 248K
    vocabulary, so it is kept per tokenizer). End of sequence is `<|im_end|>`."""
    built = _TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in built:
        built[vocab_size] = _llguidance().LLTokenizer(
            tokenizer.backend_json(),
            n_vocab=vocab_size,
            eos_token=tokenizer.encode(END_OF_TURN),
        )
    return built[vocab_size]


def response_format_grammar(response_format: Mapping | None) -> Grammar | None:
    """The grammar of an OpenAI `response_format`; None for `{"type": "text"}` or None.

    `{"type": "json_object"}`: any JSON object. `{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": true}}`: a value of that schema.
    """
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise ValueError(
                'response_format json_schema needs "json_schema": {"name": ..., "schema": '
                f"{{a JSON schema object}}}}, got {spec!r}"
            )
        name = spec.get("name", "")
        return json_schema_grammar(spec["schema"], f"response_format json_schema {name!r}")
    raise ValueError(
        'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
        f'"json_schema", "json_schema": {{...}}}}, got {response_format!r}'
    )


def json_schema_grammar(schema: Mapping, what: str = "JSON schema") -> Grammar:
    """A grammar for one JSON value of `schema`, compact; ValueError for a schema the library
    cannot compile (the message names it)."""
    llg = _llguidance()
    source = llg.LLMatcher.grammar_from_json_schema(dict(schema), overrides=JSON_OPTIONS)
    return _checked(Grammar(source, what))


def tool_call_grammar(tools: Sequence[Mapping], tool_choice) -> Grammar | None:
    """The grammar `tool_choice` asks for over OpenAI-style `tools`; None for "auto"/"none".

    "required": one or more Qwen3.5 tool calls (`<tool_call>\\n<function=NAME>\\n<parameter=P>
    \\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>`, several separated by a newline) of
    the given tools, nothing else. {"type": "function", "function": {"name": NAME}}: exactly one
    call of NAME. Each call names its required parameters, in the schema's order, then any of
    the optional ones; string values are raw text (enums: one of them), the others JSON of the
    parameter's schema.
    """
    if tool_choice in (None, "auto", "none"):
        return None
    functions = {f["name"]: f for f in map(_function, tools)}
    if tool_choice == "required":
        if not functions:
            raise ValueError('tool_choice "required" needs at least one tool in tools')
        names, calls = list(functions), "call (NL call)*"
    else:
        name = _chosen_name(tool_choice)
        if name not in functions:
            raise ValueError(
                f"tool_choice names function {name!r}, which is not among the tools "
                f"({sorted(functions)}); add it to tools or name one of them"
            )
        names, calls = [name], "call"
    alternatives = " | ".join(f"fn_{i}" for i in range(len(names)))
    rules = [
        f"start: {calls}",
        'NL: "\\n"',
        f"call: <tool_call> NL ({alternatives}) NL </tool_call>",
        # a raw string value: any text up to the first closing tag
        "raw_value[lazy]: /(?s:.*)\\n<\\/parameter>\\n/",
    ]
    for i, name in enumerate(names):
        rules += _function_rules(f"fn_{i}", functions[name])
    source = _llguidance().LLMatcher.grammar_from_lark("\n".join(rules))
    return _checked(Grammar(source, f"tool_choice {tool_choice!r}"))


def _function_rules(rule: str, function: Mapping) -> list[str]:
    """Lark rules for one `<function=NAME>...</function>` block: required parameters in order,
    then each optional one or not."""
    schema = function.get("parameters") or {}
    properties = schema.get("properties") or {}
    required = list(schema.get("required") or [])
    missing = [p for p in required if p not in properties]
    if missing:
        raise ValueError(
            f"function {function['name']!r} requires parameters {missing} that its "
            "parameters.properties do not define; define them or drop them from required"
        )
    optional = [p for p in properties if p not in required]
    params = [f"{rule}_{j}" for j in range(len(properties))]
    body = [*params[: len(required)], *(f"{p}?" for p in params[len(required) :])]
    opening = _literal("<function=" + function["name"] + ">")
    rules = [f'{rule}: {opening} NL {" ".join(body)} "</function>"']
    for param, name in zip(params, required + optional):
        opening = _literal(f"<parameter={name}>")
        rules.append(f"{param}: {opening} NL {_value(properties[name])}")
    return rules


def _value(schema: Mapping) -> str:
    """A parameter's value and closing tag as the chat template writes them: strings raw (an
    enum's: one of its values), the rest JSON of the parameter's schema."""
    if schema.get("type") == "string" and "enum" not in schema:
        return "raw_value"
    if schema.get("type") == "string":
        value = "(" + " | ".join(_literal(str(v)) for v in schema["enum"]) + ")"
    else:
        value = "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    return f'{value} NL "</parameter>" NL'


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _function(tool) -> Mapping:
    """The function of an OpenAI tool ({"type": "function", "function": {...}}) or a bare one."""
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(
            'each tool must be {"type": "function", "function": {"name": ..., "parameters": '
            f"{{JSON schema}}}}}}, got {tool!r}"
        )
    return function


def _chosen_name(tool_choice) -> str:
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", '
            f'"function": {{"name": NAME}}}}, got {tool_choice!r}'
        )
    return function["name"]


def _checked(grammar: Grammar) -> Grammar:
    """ValueError naming what was asked for when the library cannot compile the grammar."""
    error = _llguidance().LLMatcher.validate_grammar(grammar.source)
    if error:
        raise ValueError(f"{grammar.what} cannot be enforced: {error}")
    return grammar
