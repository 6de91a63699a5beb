"""Concurrent clients are batched (one decode step for all, docs/ARCHITECTURE.md §10.1) and each
gets exactly the reply it gets alone from the Python API."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from qwen35_mlx import generate, load
from qwen35_mlx.server.engine import Engine

from checkpoints import Spec
from server_fixtures import API_KEY, MODEL_ID, start_server

QUESTIONS = [
    "Hi",
    "Name a colour of the sea.",
    "What is two plus two?",
    "Write one line about the wind over the hills and the boats in the harbour at night.",
    "Say yes.",
    "List three fruits, then three vegetables, then three animals that live in the sea.",
    "Why?",
    "Tell me about the moon, the sun and the stars, in a few words each, please.",
]


@pytest.fixture(scope="module")
def served(make_checkpoint):
    directory, _ = make_checkpoint(Spec(layout="conditional"))
    model, tokenizer = load(directory)
    engine = Engine(model, tokenizer, max_queue=8, max_batch=8).start()
    running, stop = start_server(directory, engine=engine)
    yield running, (model, tokenizer)
    stop()


def test_eight_concurrent_clients_get_their_solo_replies(served):
    running, local = served
    engine = running.engine
    widest, step = [], engine._batch.step

    def counted_step():
        widest.append(len(engine._batch.active))
        return step()

    engine._batch.step = counted_step
    client = openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [[{"role": "user", "content": question}] for question in QUESTIONS]

    def ask(conversation):
        return client.chat.completions.create(
            model=MODEL_ID,
            messages=conversation,
            temperature=0,
            max_tokens=10 + len(conversation[0]["content"]) % 7,
        )

    with ThreadPoolExecutor(len(messages)) as pool:
        replies = list(pool.map(ask, messages))
    engine._batch.step = step
    assert max(widest) > 1  # requests really shared decode steps
    for conversation, reply in zip(messages, replies, strict=True):
        expected = generate(
            *local, conversation, max_tokens=10 + len(conversation[0]["content"]) % 7
        )
        assert reply.choices[0].message.content == expected.text
        assert reply.choices[0].finish_reason == expected.finish_reason
        assert reply.usage.prompt_tokens == expected.prompt_tokens
        assert reply.usage.completion_tokens == expected.generation_tokens
