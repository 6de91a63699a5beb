"""Images and videos in requests, checked at the edge: base64 `data:` URLs always; local paths
only when the server allows local files; web URLs only when it allows remote media, then
fetched here with a size and a time limit (the library itself never downloads)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MEDIA_ITEMS = {"image_url": "image", "image": "image", "video_url": "video", "video": "video"}


class MediaError(ValueError):
    """An image or video the server refuses, with the reason and the fix."""


@dataclass(frozen=True)
class MediaPolicy:
    allow_local_files: bool = False
    allow_remote_media: bool = False
    max_images: int = 8  # images and videos per request
    max_media_bytes: int = 20 << 20  # per fetched file
    fetch_timeout: float = 10.0  # seconds per fetched file


def resolve_media(messages: Sequence[Mapping], policy: MediaPolicy) -> list[dict]:
    """OpenAI-style messages whose media items are allowed by `policy`, web URLs replaced by the
    fetched bytes; MediaError for one that is refused or too many of them."""
    count = 0
    resolved = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            resolved.append(dict(message))
            continue
        items = []
        for item in content:
            kind = MEDIA_ITEMS.get(item.get("type")) if isinstance(item, Mapping) else None
            if kind is None:
                items.append(item)
                continue
            count += 1
            if count > policy.max_images:
                raise MediaError(
                    f"the request has more than {policy.max_images} images and videos, the "
                    "server's limit (--max-images); send fewer"
                )
            items.append(_resolve_item(item, kind, policy))
        resolved.append({**message, "content": items})
    return resolved


def _resolve_item(item: Mapping, kind: str, policy: MediaPolicy) -> dict:
    source = _source(item)
    if source.startswith("data:"):
        if kind == "video":
            raise MediaError("videos are read from files; data: URLs hold images only")
        return {"type": "image", "image": source}
    if source.startswith(("http://", "https://")):
        if not policy.allow_remote_media:
            raise MediaError(
                f"{source[:80]}: the server does not fetch web URLs; send the image as a "
                "base64 data: URL, or start the server with --allow-remote-media"
            )
        if kind == "video":
            raise MediaError("videos are read from local files, not fetched; send a path")
        return {"type": "image", "image": fetch(source, policy)}
    if not policy.allow_local_files:
        raise MediaError(
            f"{source[:80]}: the server does not read local files; send the image as a base64 "
            "data: URL, or start the server with --allow-local-files"
        )
    return {"type": kind, kind: source}


def _source(item: Mapping) -> str:
    """The URL or path of an OpenAI `image_url` item ({"url": ...} or a string) or of the
    library's own `image`/`video` items."""
    value = item.get(item["type"])
    if isinstance(value, Mapping):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise MediaError(
            f"a {item['type']} item needs a URL: {{'type': 'image_url', 'image_url': "
            "{'url': 'data:image/png;base64,...'}}"
        )
    return value


def fetch(url: str, policy: MediaPolicy) -> bytes:
    """The body at `url`, refused beyond `policy.max_media_bytes` or `policy.fetch_timeout`."""
    limit = policy.max_media_bytes
    try:
        with urllib.request.urlopen(url, timeout=policy.fetch_timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise MediaError(_too_large(url, limit))
            body = _read(response, limit + 1, time.monotonic() + policy.fetch_timeout)
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise MediaError(f"{url[:80]}: cannot be fetched ({error}); check the URL") from None
    if len(body) > limit:
        raise MediaError(_too_large(url, limit))
    return body


def _read(response, most: int, deadline: float) -> bytes:
    """Up to `most` bytes of `response`, TimeoutError past `deadline` (a slow sender cannot
    hold the request longer than the limit, as a per-read timeout would let it)."""
    body = bytearray()
    while len(body) < most:
        if time.monotonic() > deadline:
            raise TimeoutError("the time limit (--fetch-timeout) passed")
        chunk = response.read(min(65536, most - len(body)))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _too_large(url: str, limit: int) -> str:
    return (
        f"{url[:80]}: the file is larger than the server's limit of {limit} bytes; send a "
        "smaller image"
    )
