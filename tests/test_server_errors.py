"""Bad requests get each API's error shape and status, never a 500; limits (key, body size,
queue, media) hold; a disconnected stream frees the engine; the server survives a fuzz loop."""

import base64
import http.client
import http.server
import json
import random
import threading
import time

import anthropic
import openai
import pytest

from qwen35_mlx.server.media import MediaPolicy

from checkpoints import Spec
from server_fixtures import (
    API_KEY,
    MODEL_ID,
    open_stream,
    png_data_url,
    post_json,
    raw_post,
    start_server,
)

USER = [{"role": "user", "content": "Hello"}]
BODY_LIMIT = 200_000


@pytest.fixture(scope="module")
def served(make_checkpoint):
    directory, _ = make_checkpoint(Spec(layout="conditional", max_position_embeddings=512))
    running, stop = start_server(
        directory, max_queue=2, max_body_bytes=BODY_LIMIT, max_tokens_limit=400
    )
    yield running
    stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0)


def openai_error(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def anthropic_error(body: dict) -> dict:
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]


def test_malformed_json_is_a_400_in_each_shape(served):
    status, body = raw_post(served.port, "/v1/chat/completions", b'{"model": ')
    assert status == 400 and "not valid JSON" in openai_error(body)["message"]
    status, body = raw_post(served.port, "/v1/messages", b"[1, 2")
    assert status == 400 and anthropic_error(body)["type"] == "invalid_request_error"


def test_a_wrong_type_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=USER, temperature="hot")
    assert caught.value.body["param"] == "temperature"
    assert "temperature" in caught.value.message


def test_an_unknown_model_is_named(client, served):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert "gpt-9" in caught.value.message and MODEL_ID in caught.value.message
    messages = anthropic.Anthropic(base_url=served.url, api_key=API_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        messages.messages.create(model="claude-x", max_tokens=4, messages=USER)


def test_a_bad_image_is_a_400(client):
    broken = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    content = [{"type": "image_url", "image_url": {"url": broken}}, {"type": "text", "text": "?"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": content}], max_tokens=2
        )
    assert "not an image" in caught.value.message


def test_context_overflow_is_a_400_with_the_numbers(client):
    long = [{"role": "user", "content": "sea " * 700}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL_ID, messages=long, stream=stream)
        assert "context window is 512" in caught.value.message


def test_a_missing_key_is_a_401(served):
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 1}
    status, error = post_json(served.port, "/v1/chat/completions", body, {"Authorization": ""})
    assert status == 401 and openai_error(error)["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    claude = anthropic.Anthropic(base_url=served.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(model=MODEL_ID, max_tokens=4, messages=USER)
    accepted = anthropic.Anthropic(base_url=served.url, api_key=API_KEY, max_retries=0)
    reply = accepted.messages.create(model=MODEL_ID, max_tokens=2, messages=USER)
    assert reply.stop_reason in ("end_turn", "max_tokens")


def test_a_body_over_the_limit_is_a_413(served):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}
    status, error = post_json(served.port, "/v1/chat/completions", body)
    assert status == 413 and str(BODY_LIMIT) in openai_error(error)["message"]
    status, error = post_json(served.port, "/v1/messages", body)
    assert status == 413 and anthropic_error(error)["type"] == "request_too_large"


def test_more_than_max_tokens_limit_is_refused(client, served):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL_ID, messages=USER, max_tokens=served.server.max_tokens_limit + 1
        )
    assert "--max-tokens-limit" in caught.value.message


def test_a_full_queue_is_a_429_and_a_disconnect_frees_the_engine(client, served):
    long = {
        "model": MODEL_ID,
        "messages": USER,
        "max_tokens": 400,
        "stream": True,
        "temperature": 0,
    }
    before = served.engine.tokens_generated
    running, _ = open_stream(served.port, "/v1/chat/completions", long)
    waiting = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    waiting.request("POST", "/v1/chat/completions", json.dumps(long).encode(), headers)
    while served.engine.accepted < 2:  # queued behind the running one (its answer waits)
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2)
    running.close()
    waiting.close()
    while served.engine.accepted:  # the engine drops both: cancelled at the next token
        time.sleep(0.05)
    assert served.engine.tokens_generated - before < 400
    assert client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2).choices


def test_a_disconnect_frees_the_engine_from_a_whole_reply_too(client, served):
    long = {"model": MODEL_ID, "messages": USER, "max_tokens": 400, "temperature": 0}
    before = served.engine.tokens_generated
    waiting = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    waiting.request("POST", "/v1/chat/completions", json.dumps(long).encode(), headers)
    while served.engine.tokens_generated - before < 2:  # generating, the answer not yet sent
        time.sleep(0.01)
    waiting.close()
    while served.engine.accepted:  # cancelled at the next step
        time.sleep(0.05)
    assert served.engine.tokens_generated - before < 400
    assert client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2).choices


class _Image(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = base64.b64decode(png_data_url().split(",")[1])
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Image)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/image.png"
    httpd.shutdown()


def ask_image(client, url):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    return client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": content}], max_tokens=2
    )


def test_remote_images_only_when_allowed_and_within_limits(client, served, image_server):
    with pytest.raises(openai.BadRequestError) as caught:
        ask_image(client, image_server)
    assert "--allow-remote-media" in caught.value.message
    served.server.media = MediaPolicy(allow_remote_media=True)
    try:
        assert ask_image(client, image_server).usage.prompt_tokens > 10
        served.server.media = MediaPolicy(allow_remote_media=True, max_media_bytes=50)
        with pytest.raises(openai.BadRequestError) as caught:
            ask_image(client, image_server)
        assert "limit of 50 bytes" in caught.value.message
    finally:
        served.server.media = MediaPolicy()


def test_local_files_only_when_allowed(client, served, tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(base64.b64decode(png_data_url().split(",")[1]))
    with pytest.raises(openai.BadRequestError) as caught:
        ask_image(client, str(path))
    assert "--allow-local-files" in caught.value.message
    served.server.media = MediaPolicy(allow_local_files=True, max_images=1)
    try:
        assert ask_image(client, str(path)).choices
        two = [{"type": "image_url", "image_url": {"url": str(path)}}] * 2
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": two}], max_tokens=2
            )
        assert "--max-images" in caught.value.message
    finally:
        served.server.media = MediaPolicy()


def fuzz_bodies(rng: random.Random):
    values = [None, True, -1, 0, 1e309, "", "x", [], {}, [1], {"a": 1}, "\x00", 2**70]
    fields = [
        "model",
        "messages",
        "max_tokens",
        "temperature",
        "stream",
        "stop",
        "system",
        "top_logprobs",
        "logprobs",
        "prompt",
        "n",
        "seed",
        "stream_options",
    ]
    for _ in range(60):
        body = {"model": MODEL_ID, "messages": USER, "max_tokens": 1}
        for field in rng.sample(fields, rng.randint(1, 4)):
            body[field] = rng.choice(values)
        if rng.random() < 0.3:
            body["messages"] = [
                {"role": rng.choice(["user", "bot", 3]), "content": rng.choice(values)}
            ]
        yield json.dumps(body).encode()
    for _ in range(20):
        yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))


def test_the_server_survives_a_fuzz_loop(served, client):
    rng = random.Random(0)
    for body in fuzz_bodies(rng):
        path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/messages"])
        status, reply = raw_post(served.port, path, body)
        assert status in (200, 400, 404), (status, reply, body)
        if status != 200:
            (anthropic_error if path == "/v1/messages" else openai_error)(reply)
    assert client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2).choices


def test_unknown_routes_answer_in_the_openai_shape(served):
    status, body = post_json(served.port, "/v1/nothing", {})
    assert status == 404 and openai_error(body)["type"] == "invalid_request_error"
