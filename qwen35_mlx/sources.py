"""Where images and video frames come from: files, bytes, data: URLs, PIL images, video files
(PyAV), animated images (GIF, WebP, APNG) and folders of frames; and the one policy on URLs.

Images are decoded in full when opened, so that a truncated file fails here, after their size is
checked against PIL's decompression-bomb limit. A video source says how many frames it has, when
each starts and how large they are, and decodes only the frames the processor samples
(`Processor.video` does the sampling). Video files are decoded with PyAV, the FFmpeg binding
transformers also reads them with; it is the optional `video` extra, imported only when a video
file is opened. Nothing is downloaded: web URLs are refused with a message saying so.
"""

from __future__ import annotations

import base64
import io
import math
import re
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

VIDEO_EXTRA = 'pip install "qwen35-mlx[video]"'
# Browsers play GIF frame delays of 0 or 10 ms at 100 ms; players treat them the same way.
MIN_FRAME_MS, DEFAULT_FRAME_MS = 20, 100
# An animation's frames decode one after another (each builds on the last), so its cost is all
# its pixels: bounded before decoding, at this multiple of PIL's limit for one image, and so is
# the number of frames (a minute of video at 2 fps samples 120 of them).
ANIMATION_PIXELS_PER_IMAGE_LIMIT = 4
MAX_ANIMATION_FRAMES = 10_000


class VisionInputError(ValueError):
    """An image, video or prompt the processor cannot use, with the problem and the fix."""


def open_image(source) -> Image.Image:
    """A fully decoded, upright PIL image from a path, `data:` URL, bytes or PIL image.

    Files and bytes are decoded in full here so that truncated data fails now (PIL decodes
    lazily), sizes are checked against PIL's decompression-bomb limit before decoding, and the
    EXIF orientation is applied as transformers' `load_image` does.
    """
    if isinstance(source, Image.Image):
        return _decoded(source, "the PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, file = "the image bytes", io.BytesIO(bytes(source))
    elif isinstance(source, str) and source.startswith("data:"):
        name, file = "the data: URL", io.BytesIO(_data_url_bytes(source))
    elif isinstance(source, (str, Path)):
        name = file = existing_file(local_source(source))
    else:
        raise VisionInputError(
            f"cannot read an image from a {type(source).__name__}; pass a file path, a "
            "data: URL, the file's bytes or a PIL.Image"
        )
    image = open_file(file, name)
    if image is None:
        raise VisionInputError(
            f"{name} is not an image PIL can read; pass a PNG, JPEG, WebP, GIF, BMP or TIFF "
            "file (videos go through the video path)"
        )
    return ImageOps.exif_transpose(_decoded(image, name))


def local_source(source):
    """What can be read here (a path, PIL image, bytes or base64 data: URL): file:// URLs become
    paths; web URLs are refused, as nothing is downloaded."""
    if source is None:
        raise VisionInputError(
            "an image or video item has no source; give a path, a PIL image, bytes or a data: URL"
        )
    if not isinstance(source, str):
        return source
    if source.startswith("file://"):
        return urllib.parse.unquote(source[len("file://") :])
    if source.startswith(("http://", "https://")):
        raise VisionInputError(
            f"{source[:80]}: web URLs are not fetched; download the file "
            "first and pass its path (or a data: URL)"
        )
    return source


def existing_file(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise VisionInputError(f"{path}: no such file; check the path")
    return path


def open_file(file, name) -> Image.Image | None:
    """PIL's lazy open, its size checked; None when PIL does not recognise the format."""
    try:
        image = Image.open(file)
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError as error:
        raise VisionInputError(_bomb_message(name, str(error))) from None
    except OSError as error:
        raise VisionInputError(f"{name} cannot be read ({error})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise VisionInputError(
            _bomb_message(
                name,
                f"{image.width}×{image.height} = {image.width * image.height} pixels is above "
                f"the limit of {limit}",
            )
        )
    return image


def _decoded(image: Image.Image, name) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise VisionInputError(
            f"{name} cannot be decoded ({error}); the file is truncated or corrupt, get a "
            "complete copy"
        ) from None
    return image


def _bomb_message(name, detail: str) -> str:
    return (
        f"{name}: {detail} (PIL's guard against decompression bombs). If you trust the "
        "file, raise the limit before loading: `PIL.Image.MAX_IMAGE_PIXELS = <pixels>`"
    )


def _data_url_bytes(url: str) -> bytes:
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise VisionInputError("only base64 data: URLs are supported (data:image/png;base64,...)")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise VisionInputError("the data: URL does not hold valid base64") from None


@dataclass(frozen=True)
class Frames:
    """A video's frames, not yet decoded."""

    times: list[float]  # start of each frame, seconds
    fps: float  # source frames per second (for a variable-rate GIF: frames / duration)
    height: int
    width: int
    read: Callable[[Sequence[int]], Iterator[Image.Image]]  # decode frames at sorted indices


def open_frames(source, *, source_fps: float | None, default_fps: float) -> Frames:
    """The frames of a video file, an animated image or a directory of frame images.

    Args:
        source: a path.
        source_fps: the source's frame rate, overriding a file's own (and a GIF's delays).
        default_fps: the rate of a frames directory when `source_fps` is not given.

    Raises:
        VisionInputError: a missing path, an empty folder, a file without decodable frames, a
            still image, or a video file without PyAV installed.
    """
    if source_fps is not None and not (
        isinstance(source_fps, (int, float)) and math.isfinite(source_fps) and source_fps > 0
    ):
        raise VisionInputError(f"a video's fps must be a positive number, got {source_fps!r}")
    if not isinstance(source, (str, Path)):
        raise VisionInputError(
            f"cannot read a video from a {type(source).__name__}; pass the path of a video "
            "file, an animated GIF or a directory of frame images"
        )
    path = existing_file(source)
    if path.is_dir():
        return _directory_frames(path, source_fps or default_fps)
    image = open_file(path, path)
    if image is None or image.format == "MPEG":  # PIL identifies MPEG-1 but cannot decode it
        return _video_file_frames(path, source_fps)
    if getattr(image, "n_frames", 1) < 2:
        raise VisionInputError(f"{path} is a still image, not a video; pass it as an image")
    return _animated_frames(path, image, source_fps)


def _uniform(count: int, fps: float, height: int, width: int, read) -> Frames:
    return Frames([index / fps for index in range(count)], fps, height, width, read)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _directory_frames(directory: Path, fps: float) -> Frames:
    """Image files of a folder in name order, numbers compared by value (frame2 < frame10)."""
    extensions = Image.registered_extensions()
    files = sorted(
        (
            file
            for file in directory.iterdir()
            if file.is_file()
            and not file.name.startswith(".")
            and file.suffix.lower() in extensions
        ),
        key=_natural_key,
    )
    if not files:
        raise VisionInputError(
            f"{directory} holds no image files (.png, .jpg, ...); put the video's frames "
            "there, or pass a video file"
        )
    first = open_image(files[0])
    size = first.size

    def read(indices: Sequence[int]) -> Iterator[Image.Image]:
        for index in indices:
            frame = first if index == 0 else open_image(files[index])
            if frame.size != size:
                raise VisionInputError(
                    f"{files[index]} is {frame.width}×{frame.height} but {files[0].name} is "
                    f"{size[0]}×{size[1]}; the frames of a video must share one size"
                )
            yield frame

    return _uniform(len(files), fps, first.height, first.width, read)


def _animated_frames(path: Path, image: Image.Image, source_fps: float | None) -> Frames:
    """Frames of a GIF, animated WebP or APNG; their delays are the clock."""
    _check_animation_size(path, image.n_frames, image.width, image.height)
    try:
        delays = []
        for index in range(image.n_frames):
            image.seek(index)
            delay = image.info.get("duration") or 0
            delays.append(delay if delay >= MIN_FRAME_MS else DEFAULT_FRAME_MS)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise VisionInputError(
            f"{path} cannot be decoded ({error}); the file is truncated or "
            "corrupt, get a complete copy"
        ) from None

    def read(indices: Sequence[int]) -> Iterator[Image.Image]:
        for index in indices:
            image.seek(index)
            yield image.copy()

    if source_fps is not None:
        return _uniform(len(delays), source_fps, image.height, image.width, read)
    times = [sum(delays[:index]) / 1000 for index in range(len(delays))]
    return Frames(times, len(delays) / (sum(delays) / 1000), image.height, image.width, read)


def _check_animation_size(path: Path, frames: int, width: int, height: int) -> None:
    """VisionInputError for an animation too large to decode, before any frame is decoded."""
    if frames > MAX_ANIMATION_FRAMES:
        raise VisionInputError(
            f"{path} has {frames} frames, more than the {MAX_ANIMATION_FRAMES} an animation may "
            "have here; cut it, or pass it as a video file or a folder of sampled frames"
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and frames * width * height > ANIMATION_PIXELS_PER_IMAGE_LIMIT * limit:
        raise VisionInputError(
            _bomb_message(
                path,
                f"{frames} frames of {width}×{height} = {frames * width * height} pixels to "
                f"decode is above {ANIMATION_PIXELS_PER_IMAGE_LIMIT} × the limit of {limit} "
                "(animation frames decode one after another)",
            )
        )


def _check_frame_size(path: Path, width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise VisionInputError(
            _bomb_message(
                path,
                f"frames of {width}×{height} = {width * height} pixels are above the limit of "
                f"{limit}",
            )
        )


def _video_file_frames(path: Path, source_fps: float | None) -> Frames:
    try:
        import av
    except ImportError:
        raise VisionInputError(
            f"{path}: reading video files needs PyAV; install it with {VIDEO_EXTRA}, or pass "
            "a directory of frames or an animated GIF"
        ) from None
    undecodable = (
        f"{path} has no decodable video frames: it is not a video file or it is "
        "empty or corrupt; check that a player opens it, or re-encode it"
    )
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VisionInputError(f"{path} has no video stream; pass a video file")
            stream = container.streams.video[0]
            rate = source_fps or stream.average_rate or stream.guessed_rate
            # the header's count, as transformers uses; counted by decoding where it is absent
            count = stream.frames or sum(1 for _ in container.decode(stream))
            height, width = stream.codec_context.height, stream.codec_context.width
            _check_frame_size(path, width, height)
    except av.FFmpegError:
        raise VisionInputError(undecodable) from None
    if not count:
        raise VisionInputError(undecodable)
    if not rate:
        raise VisionInputError(f"{path} does not state its frame rate; pass source_fps")

    def read(indices: Sequence[int]) -> Iterator[Image.Image]:
        wanted = iter(indices)
        target = next(wanted, None)
        try:
            with av.open(str(path)) as container:
                for index, frame in enumerate(container.decode(video=0)):
                    while index == target:  # an index may repeat when frames are few
                        yield frame.to_image()
                        target = next(wanted, None)
                    if target is None:
                        return
        except av.FFmpegError as error:
            raise VisionInputError(f"{path} stops decoding ({error}); re-encode it") from None
        raise VisionInputError(
            f"{path} says it has {count} frames but fewer decode; re-encode it (e.g. "
            f"`ffmpeg -i {path.name} fixed.mp4`) or pass source frames as a directory"
        )

    return _uniform(count, float(rate), height, width, read)
