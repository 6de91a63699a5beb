"""A real server on a free loopback port, with the tiny vision checkpoint, for the server tests;
and raw HTTP for what the official clients cannot send."""

from __future__ import annotations

import base64
import http.client
import io
import json
from dataclasses import dataclass

from PIL import Image

from qwen35_mlx import load
from qwen35_mlx.server.app import Server, create_app
from qwen35_mlx.server.engine import Engine
from qwen35_mlx.server.media import MediaPolicy
from qwen35_mlx.server.run import serve_in_thread

API_KEY = "test-key"
MODEL_ID = "tiny-qwen35"


@dataclass
class Running:
    url: str
    port: int
    server: Server
    directory: object

    @property
    def engine(self) -> Engine:
        return self.server.engine


def start_server(directory, engine: Engine | None = None, **limits):
    """(Running, stop) for a server over `directory`'s checkpoint (or over `engine`)."""
    if engine is None:
        engine = Engine(*load(directory), max_queue=limits.pop("max_queue", 2)).start()
    media = MediaPolicy(**limits.pop("media", {}))
    server = Server(engine, model_id=MODEL_ID, api_key=API_KEY, media=media, **limits)
    port, stop_serving = serve_in_thread(create_app(server))

    def stop():
        stop_serving()
        engine.stop()

    return Running(f"http://127.0.0.1:{port}", port, server, directory), stop


def raw_post(port: int, path: str, body: bytes, headers: dict | None = None):
    """(status, the body parsed as JSON, or as text when it is not JSON) of a POST sent as
    given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"} | (
        headers or {}
    )
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data.decode()


def post_json(port: int, path: str, value, headers: dict | None = None):
    return raw_post(port, path, json.dumps(value).encode(), headers)


def open_stream(port: int, path: str, value) -> tuple[http.client.HTTPConnection, bytes]:
    """A streaming request whose first event has arrived: (the open connection, that event)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    connection.request("POST", path, body=json.dumps(value).encode(), headers=headers)
    response = connection.getresponse()
    assert response.status == 200, response.read()
    return connection, response.fp.readline()


def png_data_url(size=(64, 48), color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
