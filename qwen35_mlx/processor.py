"""Qwen3.5 image and video processor: pixels into patches, placeholders into prompt tokens.

Images reproduce transformers' PIL-backend `Qwen2VLImageProcessorPil` (5.23; the backend
`AutoImageProcessor` picks when torchvision is absent): RGB on a white background, smart resize
to multiples of 32 px, PIL bicubic, rescale 1/255, normalise, patches in 2×2 merge-block order
(docs/ARCHITECTURE.md §5). Videos follow `Qwen3VLVideoProcessor` for sampling, sizes and patch
order, with frames resized by the same PIL path as images (transformers resizes video frames with
torchvision, which differs after resizing by up to ~0.17 of the [-1, 1] range). Prompts get one
`<t seconds>` marker and vision block per temporal group, as the original Qwen3-VL processor
writes them (sources.py reads the images and frames).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .sources import VisionInputError, open_frames, open_image

# The released Qwen3.5 processor files (every size ships the same two); used when a checkpoint
# lacks them, and written into test and benchmark checkpoints.
PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
VIDEO_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}
PROCESSOR_FILES = {
    "preprocessor_config.json": PREPROCESSOR_CONFIG,
    "video_preprocessor_config.json": VIDEO_PREPROCESSOR_CONFIG,
}
# Qwen3VLVideoProcessor's class defaults (the released file does not set them).
VIDEO_SAMPLING = {"fps": 2.0, "min_frames": 4, "max_frames": 768}
RESCALE_FACTOR = 1 / 255  # transformers' default (the released files do not set it)
# the keys that set how pixels become patches, the same in both files
PATCHING = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
MAX_ASPECT_RATIO = 200
BICUBIC = 3  # PIL's number for bicubic, as `resample` stores it
# config.json id field -> the token transformers' processor uses when the tokenizer is silent
TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


@dataclass(frozen=True)
class ImageInputs:
    """Patches of one or more images, in the order given."""

    pixel_values: np.ndarray  # [N_patches, C*Tp*P*P] float32, each image's patches in turn
    grid_thw: np.ndarray  # [n_images, 3] int64: (1, rows, cols) in patches


@dataclass(frozen=True)
class VideoInputs:
    """Patches of one video and the time of each temporal group."""

    pixel_values: np.ndarray  # [T/Tp * rows * cols, C*Tp*P*P] float32
    grid_thw: np.ndarray  # [1, 3] int64: (T/Tp, rows, cols)
    timestamps: list[float]  # seconds, one per temporal group


@dataclass(frozen=True)
class VisionTokens:
    """The placeholder strings of a checkpoint's tokenizer."""

    image: str = TOKEN_FIELDS["image_token_id"]
    video: str = TOKEN_FIELDS["video_token_id"]
    start: str = TOKEN_FIELDS["vision_start_token_id"]
    end: str = TOKEN_FIELDS["vision_end_token_id"]


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    frames: int | None = None,
    temporal_factor: int = 1,
) -> tuple[int, int]:
    """The (height, width) an image or video frame is resized to: multiples of `factor`, near
    the original aspect ratio, with frames·h·w inside [min_pixels, max_pixels].

    transformers' `smart_resize` of qwen2_vl (images: frames=None) and of qwen3_vl (videos: the
    budget covers all sampled frames, and a side below `factor` is first scaled up to it).
    """
    if frames is not None and min(height, width) < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VisionInputError(
            f"{width}×{height} pixels is an aspect ratio of "
            f"{max(height, width) / min(height, width):.0f}; Qwen3.5 accepts at most "
            f"{MAX_ASPECT_RATIO}:1. Crop or pad the image (or video) to a less elongated shape"
        )
    frames = frames or 1
    rounded_frames = round(frames / temporal_factor) * temporal_factor
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if rounded_frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif rounded_frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it: transparency (an alpha band, or a
    palette/greyscale transparent colour) composited onto white, other modes via PIL."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, height: int, width: int) -> np.ndarray:
    """[height, width, 3] uint8: PIL bicubic on the RGB image, as transformers' PIL backend."""
    return np.asarray(image.resize((width, height), resample=BICUBIC))


class Processor:
    """Turns images and videos into the vision tower's inputs and expands prompt placeholders.

    Build it with `Processor.from_pretrained(directory)`.
    """

    def __init__(
        self,
        *,
        patch_size: int = PREPROCESSOR_CONFIG["patch_size"],
        temporal_patch_size: int = PREPROCESSOR_CONFIG["temporal_patch_size"],
        merge_size: int = PREPROCESSOR_CONFIG["merge_size"],
        image_mean: Sequence[float] = PREPROCESSOR_CONFIG["image_mean"],
        image_std: Sequence[float] = PREPROCESSOR_CONFIG["image_std"],
        rescale_factor: float = RESCALE_FACTOR,
        min_pixels: int = PREPROCESSOR_CONFIG["size"]["shortest_edge"],
        max_pixels: int = PREPROCESSOR_CONFIG["size"]["longest_edge"],
        video_min_pixels: int = VIDEO_PREPROCESSOR_CONFIG["size"]["shortest_edge"],
        video_max_pixels: int = VIDEO_PREPROCESSOR_CONFIG["size"]["longest_edge"],
        fps: float = VIDEO_SAMPLING["fps"],
        min_frames: int = VIDEO_SAMPLING["min_frames"],
        max_frames: int = VIDEO_SAMPLING["max_frames"],
        source_fps: float | None = None,
        tokens: VisionTokens = VisionTokens(),
    ):
        """
        Args:
            patch_size, temporal_patch_size, merge_size: the vision tower's patching.
            image_mean, image_std, rescale_factor: pixel normalisation, (x·scale − mean) / std.
            min_pixels, max_pixels: bounds on an image's resized h·w.
            video_min_pixels, video_max_pixels: bounds on a video's frames·h·w.
            fps: frames sampled per second of video; min_frames, max_frames bound their number.
            source_fps: the frame rate of folders of frames (default: `fps`, so that every
                frame is kept up to max_frames); a video item's own "fps" wins.
            tokens: the prompt placeholder strings.
        """
        if not 0 < min_pixels <= max_pixels or not 0 < video_min_pixels <= video_max_pixels:
            raise VisionInputError(
                f"pixel bounds must satisfy 0 < min <= max; got images [{min_pixels}, "
                f"{max_pixels}], videos [{video_min_pixels}, {video_max_pixels}]"
            )
        if source_fps is not None and not source_fps > 0:
            raise VisionInputError(f"source_fps must be positive, got {source_fps}")
        if not (fps > 0 and 1 <= min_frames <= max_frames):
            raise VisionInputError(
                f"need fps > 0 and 1 <= min_frames <= max_frames; got fps={fps}, "
                f"min_frames={min_frames}, max_frames={max_frames}"
            )
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        self.merge_size = merge_size
        self.mean = np.asarray(image_mean, dtype=np.float32)
        self.std = np.asarray(image_std, dtype=np.float32)
        self.rescale_factor = rescale_factor
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels
        self.fps, self.min_frames, self.max_frames = fps, min_frames, max_frames
        self.source_fps = source_fps
        self.tokens = tokens

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> Processor:
        """Read a checkpoint's preprocessor_config.json and video_preprocessor_config.json
        (the released Qwen3.5 values where a file is absent) and its placeholder tokens
        (config.json's ids looked up in tokenizer_config.json).

        Args:
            directory: the checkpoint folder.
            **overrides: any `Processor` argument, e.g. `max_pixels=1024*1024` to bound the
                image tokens (max_pixels/1024 per image) or `fps=1`.
        """
        directory = Path(directory)
        image_file = _read_json(directory / "preprocessor_config.json", PREPROCESSOR_CONFIG)
        video_file = _read_json(
            directory / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG
        )
        settings = _image_settings(image_file, directory / "preprocessor_config.json")
        settings.update(
            _video_settings(video_file, directory / "video_preprocessor_config.json", settings),
            tokens=_read_tokens(directory),
            source_fps=None,
        )
        unknown = set(overrides) - set(settings)
        if unknown:
            raise VisionInputError(
                f"unknown processor setting(s) {sorted(unknown)}; choose from {sorted(settings)}"
            )
        return cls(**{**settings, **overrides})

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged block of patches."""
        return self.patch_size * self.merge_size

    def images(self, sources: Iterable) -> ImageInputs:
        """Patches of each image (a path, `data:` URL, bytes or PIL.Image), in order.

        Raises:
            VisionInputError: a missing, unreadable, truncated or oversized file, or an aspect
                ratio above 200:1.
        """
        patches, grids = [], []
        for source in sources:
            image = to_rgb(open_image(source))
            height, width = smart_resize(
                image.height,
                image.width,
                factor=self.factor,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
            pixels = self.normalize(resize(image, height, width))[None]  # [1, H, W, C]
            patches.append(
                self.patchify(
                    np.broadcast_to(pixels, (self.temporal_patch_size, *pixels.shape[1:]))
                )
            )
            grids.append((1, height // self.patch_size, width // self.patch_size))
        width = 3 * self.temporal_patch_size * self.patch_size**2
        return ImageInputs(
            pixel_values=np.concatenate(patches) if patches else np.zeros((0, width), np.float32),
            grid_thw=np.array(grids, dtype=np.int64).reshape(-1, 3),
        )

    def video(self, source, *, source_fps: float | None = None) -> VideoInputs:
        """Patches and group timestamps of a video: a video file (needs PyAV, the `video`
        extra), an animated image such as a GIF (its frame durations are its clock), or a
        directory of frame images (in name order).

        Args:
            source: the path.
            source_fps: frames per second of this video: of a frames directory (default: the
                processor's `source_fps`), or replacing a file's own rate.
        """
        frames = open_frames(source, source_fps=source_fps, default_fps=self.source_fps or self.fps)
        indices = self.sample_indices(len(frames.times), frames.fps)
        height, width = smart_resize(
            frames.height,
            frames.width,
            factor=self.factor,
            min_pixels=self.video_min_pixels,
            max_pixels=self.video_max_pixels,
            frames=len(indices),
            temporal_factor=self.temporal_patch_size,
        )
        pixels = np.stack(
            [resize(to_rgb(frame), height, width) for frame in frames.read(indices)]
        )  # [T, H, W, C] uint8
        padding = -len(indices) % self.temporal_patch_size  # repeat the last frame
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], padding, axis=0)])
        times = [frames.times[i] for i in indices] + [frames.times[indices[-1]]] * padding
        groups = len(times) // self.temporal_patch_size
        starts, ends = (
            times[:: self.temporal_patch_size],
            times[self.temporal_patch_size - 1 :: self.temporal_patch_size],
        )
        return VideoInputs(
            pixel_values=self.patchify(self.normalize(pixels)),
            grid_thw=np.array(
                [[groups, height // self.patch_size, width // self.patch_size]], dtype=np.int64
            ),
            timestamps=[(start + end) / 2 for start, end in zip(starts, ends)],
        )

    def sample_indices(self, total: int, source_fps: float) -> list[int]:
        """Frame indices to keep: `fps` per second of video, within [min_frames, max_frames]
        and at most every frame, evenly spread (transformers' `Qwen3VLVideoProcessor`)."""
        count = int(total / source_fps * self.fps)
        count = min(max(count, self.min_frames), self.max_frames, total)
        return np.linspace(0, total - 1, count).round().astype(int).tolist()

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 -> float32 (x·scale − mean) / std, with transformers' dtype steps."""
        scaled = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        return (scaled - self.mean) / self.std

    def patchify(self, pixels: np.ndarray) -> np.ndarray:
        """[T, H, W, C] (T a multiple of Tp) -> [T/Tp·H/P·W/P, C·Tp·P·P], patches in the order
        (group, block row, block col, row in block, col in block), each vector (C, Tp, P, P)."""
        T, H, W, C = pixels.shape
        P, M, Tp = self.patch_size, self.merge_size, self.temporal_patch_size
        blocks = pixels.reshape(T // Tp, Tp, H // (P * M), M, P, W // (P * M), M, P, C)
        # [groups, block rows, block cols, M, M, C, Tp, P, P]
        blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return np.ascontiguousarray(blocks, dtype=np.float32).reshape(-1, C * Tp * P * P)

    def expand(
        self,
        text: str,
        *,
        image_grid_thw: np.ndarray | None = None,
        videos: Sequence[VideoInputs] = (),
    ) -> str:
        """Prompt text with each placeholder grown to its features' token count.

        Each `<|image_pad|>` becomes t·h·w/merge² pads of the next image; each
        `<|vision_start|><|video_pad|><|vision_end|>` becomes, per temporal group,
        `<{t:.1f} seconds><|vision_start|>` + h·w/merge² video pads + `<|vision_end|>`.

        Raises:
            VisionInputError: placeholders and inputs differ in number, or a video pad
                stands outside its start/end pair.
        """
        grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else image_grid_thw
        image_parts = text.split(self.tokens.image)
        _check_count(len(image_parts) - 1, len(grids), self.tokens.image, "image")
        text = "".join(
            part + self.tokens.image * (int(np.prod(grid)) // self.merge_size**2)
            for part, grid in zip(image_parts, [*grids, (0, 0, 0)])
        )
        triple = self.tokens.start + self.tokens.video + self.tokens.end
        video_parts = text.split(triple)
        stray = sum(part.count(self.tokens.video) for part in video_parts)
        if stray:
            raise VisionInputError(
                f"the prompt has {stray} {self.tokens.video} outside `{triple}`; write each "
                "video placeholder as that whole triple, as the chat template does"
            )
        _check_count(len(video_parts) - 1, len(videos), triple, "video")
        return "".join(
            part + (self._video_prompt(video) if video is not None else "")
            for part, video in zip(video_parts, [*videos, None])
        )

    def _video_prompt(self, video: VideoInputs) -> str:
        groups, rows, cols = (int(n) for n in video.grid_thw[0])
        pads = self.tokens.video * (rows * cols // self.merge_size**2)
        return "".join(
            f"<{seconds:.1f} seconds>{self.tokens.start}{pads}{self.tokens.end}"
            for seconds in video.timestamps[:groups]
        )


def _check_count(placeholders: int, inputs: int, token: str, kind: str) -> None:
    if placeholders != inputs:
        raise VisionInputError(
            f"the prompt has {placeholders} {token} placeholder(s) but {inputs} {kind}(s) were "
            f"given; give one {kind} per placeholder"
        )


def _read_json(file: Path, default: dict) -> dict:
    if not file.is_file():
        return default
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VisionInputError(
            f"{file} cannot be read as JSON ({error}); re-download it or "
            "delete it to use the Qwen3.5 defaults"
        ) from None
    if not isinstance(content, dict):
        raise VisionInputError(f"{file} must hold a JSON object; re-download it")
    return content


def _common_settings(content: dict, file: Path) -> dict:
    # Files written by transformers' save_pretrained carry every attribute of the class, so
    # other keys are metadata; the ones below change the computation and are checked.
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if content.get(flag, True) is not True:
            raise VisionInputError(
                f"{file}: {flag}={content[flag]} is not supported (Qwen3.5 "
                "always applies it); remove the key"
            )
    if content.get("resample", BICUBIC) != BICUBIC:
        raise VisionInputError(
            f"{file}: resample={content['resample']} is not supported; "
            f"Qwen3.5 resizes with bicubic ({BICUBIC})"
        )
    size = content.get("size") or {}
    return {
        **{key: content.get(key, PREPROCESSOR_CONFIG[key]) for key in PATCHING},
        "rescale_factor": content.get("rescale_factor", RESCALE_FACTOR),
        # older files (Qwen2-VL) give the bounds as min_pixels/max_pixels, which win
        "min_pixels": content.get("min_pixels") or size.get("shortest_edge"),
        "max_pixels": content.get("max_pixels") or size.get("longest_edge"),
    }


def _image_settings(content: dict, file: Path) -> dict:
    settings = _common_settings(content, file)
    if settings["min_pixels"] is None or settings["max_pixels"] is None:
        raise VisionInputError(
            f"{file}: no pixel bounds (size.shortest_edge and size.longest_edge); re-download it"
        )
    return settings


def _video_settings(content: dict, file: Path, image_settings: dict) -> dict:
    settings = _common_settings(content, file)
    for key in (*PATCHING, "rescale_factor"):
        if key in content and settings[key] != image_settings[key]:
            raise VisionInputError(
                f"{file}: {key}={content[key]} differs from preprocessor_config.json's "
                f"{image_settings[key]}; the vision tower has one patching, make them agree"
            )
    released = VIDEO_PREPROCESSOR_CONFIG["size"]
    return {
        "video_min_pixels": settings["min_pixels"] or released["shortest_edge"],
        "video_max_pixels": settings["max_pixels"] or released["longest_edge"],
        **{key: content.get(key, value) for key, value in VIDEO_SAMPLING.items()},
    }


def _read_tokens(directory: Path) -> VisionTokens:
    """config.json's placeholder ids, spelled as tokenizer_config.json's added tokens."""
    config = _read_json(directory / "config.json", {})
    names = _read_json(directory / "tokenizer_config.json", {}).get("added_tokens_decoder", {})
    strings = {}
    for field, default in TOKEN_FIELDS.items():
        entry = names.get(str(config.get(field)), {})
        strings[field] = entry.get("content", default) if isinstance(entry, dict) else default
    return VisionTokens(
        image=strings["image_token_id"],
        video=strings["video_token_id"],
        start=strings["vision_start_token_id"],
        end=strings["vision_end_token_id"],
    )
