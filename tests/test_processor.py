"""The image/video processor against transformers and hand-computed expectations.

Images: transformers' PIL-backend `Qwen2VLImageProcessorPil`, built from the same released
preprocessor_config.json, is the oracle for pixel_values and grid_thw; `Qwen3VLProcessor` (with
the tiny tokenizer) is the oracle for the expanded prompt's token ids. transformers 5.23's video
processor needs torchvision, which is not installed here, so videos are checked against frames
decoded independently (PyAV / PIL), transformers' image-path transforms at the video's size, a
naive patch loop, and sampling indices and timestamps computed by hand.
"""

import json
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from qwen35_mlx.processor import PREPROCESSOR_CONFIG, ImageInputs, Processor, VideoInputs
from qwen35_mlx.sources import VisionInputError
from qwen35_mlx.tokenizer import Tokenizer

from checkpoints import VISION_IDS, Spec
from metrics import relative_error
from processor_files import write_processor_files
from tokenizer_files import write_tokenizer_files

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor  # noqa: E402
from transformers.image_transforms import normalize, rescale, resize  # noqa: E402

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tokenizer and processor files of a checkpoint (no weights needed here)."""
    directory = tmp_path_factory.mktemp("processor")
    write_tokenizer_files(directory, thinking_by_default=False)
    write_processor_files(directory)
    return directory


@pytest.fixture(scope="module")
def processor(checkpoint):
    return Processor.from_pretrained(checkpoint)


def noise(width, height, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)


def mode_image(mode: str) -> Image.Image:
    rgba = noise(61, 43, 4)
    if mode == "RGBA":
        return Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        return Image.fromarray(rgba[..., :2].copy(), "LA")
    if mode == "CMYK":
        return Image.fromarray(rgba, "CMYK")
    if mode == "I;16":
        return Image.frombytes("I;16", (61, 43), rgba[..., :2].tobytes())
    image = Image.fromarray(rgba[..., :3].copy(), "RGB").convert(mode.removesuffix("-transparent"))
    if mode == "P-transparent":
        image.info["transparency"] = 7  # palette entry 7 is see-through
    return image


SIZES = {  # (width, height)
    "37x91": (37, 91),
    "300x500": (300, 500),
    "641x479": (641, 479),
    "tiny-5x7-upscaled": (5, 7),
    "1x1": (1, 1),
    "tall-32x3000": (32, 3000),
    "wide-3000x40": (3000, 40),
    "ratio-199": (20, 3980),
}
MODES = ["L", "RGBA", "P", "P-transparent", "LA", "CMYK", "I;16", "1"]


def reference_images(directory, images, **overrides):
    reference = Qwen2VLImageProcessorPil.from_pretrained(directory, **overrides)
    return reference(images=images)


def assert_images_equal(ours: ImageInputs, reference):
    np.testing.assert_array_equal(ours.grid_thw, np.asarray(reference["image_grid_thw"]))
    assert ours.grid_thw.dtype == np.int64 and ours.pixel_values.dtype == np.float32
    expected = np.asarray(reference["pixel_values"])
    assert relative_error(ours.pixel_values, expected) <= 1e-6
    assert np.abs(ours.pixel_values - expected).max() <= 1e-6


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_image_sizes_match_transformers(processor, checkpoint, size):
    image = Image.fromarray(noise(*size, seed=size[0]))
    assert_images_equal(processor.images([image]), reference_images(checkpoint, [image]))


@pytest.mark.parametrize("mode", MODES)
def test_image_modes_match_transformers(processor, checkpoint, mode):
    image = mode_image(mode)
    assert_images_equal(processor.images([image]), reference_images(checkpoint, [image]))


def test_released_bounds_give_the_documented_grids(processor):
    # docs/ARCHITECTURE.md §5: 300×500 -> 288×512, 40×60 -> 224×320 (upscaled to >= 65536 pixels)
    grids = processor.images([Image.new("RGB", (500, 300)), Image.new("RGB", (60, 40))]).grid_thw
    assert grids.tolist() == [[1, 18, 32], [1, 14, 20]]


def test_several_images_and_file_sources_match_transformers(processor, checkpoint, tmp_path):
    rgb = Image.fromarray(noise(123, 77))
    rgb.save(tmp_path / "a.png")
    rgba = mode_image("RGBA")
    rgba.save(tmp_path / "b.png")
    sources = [tmp_path / "a.png", str(tmp_path / "b.png"), (tmp_path / "a.png").read_bytes()]
    reference = reference_images(checkpoint, [rgb, rgba, rgb])
    assert_images_equal(processor.images(sources), reference)


def test_exif_orientation_is_applied(processor, checkpoint, tmp_path):
    image = Image.fromarray(noise(80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image.save(tmp_path / "rotated.png", exif=exif)
    upright = image.transpose(Image.Transpose.ROTATE_270)  # PIL's exif_transpose for 6
    assert_images_equal(
        processor.images([tmp_path / "rotated.png"]), reference_images(checkpoint, [upright])
    )


def test_pixel_bounds_overrides_match_transformers(checkpoint):
    ours = Processor.from_pretrained(checkpoint, min_pixels=32 * 32, max_pixels=64 * 64 * 2)
    images = [Image.fromarray(noise(641, 479)), Image.fromarray(noise(9, 11))]
    reference = reference_images(checkpoint, images, min_pixels=32 * 32, max_pixels=64 * 64 * 2)
    assert_images_equal(ours.images(images), reference)


def test_expanded_prompt_tokens_match_transformers(processor, checkpoint):
    class ImageOnlyProcessor(Qwen3VLProcessor):  # its video processor needs torchvision
        def check_argument_for_proper_class(self, name, argument):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, argument)

    reference = ImageOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(checkpoint),
        tokenizer=transformers.AutoTokenizer.from_pretrained(checkpoint),
        video_processor=None,
    )
    images = [Image.fromarray(noise(300, 500)), Image.fromarray(noise(37, 91))]
    text = f"Compare {IMAGE} with\n{IMAGE} please."
    expected = reference(text=[text], images=images)["input_ids"][0]
    inputs = processor.images(images)
    ids = Tokenizer.from_pretrained(checkpoint).encode(
        processor.expand(text, image_grid_thw=inputs.grid_thw)
    )
    assert ids == list(expected)
    assert ids.count(505) == int(inputs.grid_thw.prod(axis=1).sum()) // 4


def test_checkpoint_tokens_come_from_its_files(make_checkpoint):
    directory, _ = make_checkpoint(Spec(layout="conditional"))
    processor = Processor.from_pretrained(directory)
    tokenizer = Tokenizer.from_pretrained(directory)
    tokens = processor.tokens
    assert [
        tokenizer.encode(token) for token in (tokens.image, tokens.video, tokens.start, tokens.end)
    ] == [
        [VISION_IDS["image_token_id"]],
        [VISION_IDS["video_token_id"]],
        [VISION_IDS["vision_start_token_id"]],
        [VISION_IDS["vision_end_token_id"]],
    ]
    assert (processor.min_pixels, processor.max_pixels) == (65536, 16777216)
    assert (processor.video_min_pixels, processor.video_max_pixels) == (4096, 25165824)
    assert (processor.fps, processor.min_frames, processor.max_frames) == (2.0, 4, 768)


def test_missing_files_give_the_released_settings(tmp_path, processor):
    defaults = Processor.from_pretrained(tmp_path)
    for name in (
        "min_pixels",
        "max_pixels",
        "video_min_pixels",
        "video_max_pixels",
        "fps",
        "min_frames",
        "max_frames",
        "patch_size",
        "merge_size",
        "tokens",
    ):
        assert getattr(defaults, name) == getattr(processor, name), name


def test_bad_settings_are_errors(tmp_path):
    with pytest.raises(VisionInputError, match="max_pixel"):
        Processor.from_pretrained(tmp_path, max_pixel=100)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**PREPROCESSOR_CONFIG, "resample": 2})
    )
    with pytest.raises(VisionInputError, match="resample=2"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(VisionInputError, match="JSON"):
        Processor.from_pretrained(tmp_path)
    with pytest.raises(VisionInputError, match="min <= max"):
        Processor(min_pixels=4096, max_pixels=1024)


# --- bad images ------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: a bomb to PIL's size check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_truncated_image_is_an_error(processor, tmp_path, kind):
    path = tmp_path / f"cut.{kind}"
    Image.fromarray(noise(200, 150)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VisionInputError, match="truncated or corrupt"):
        processor.images([path])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_an_error(processor, tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header(40000, 40000))
    with pytest.raises(VisionInputError, match="MAX_IMAGE_PIXELS"):
        processor.images([tmp_path / "bomb.png"])
    Image.fromarray(noise(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL only warns below twice this
    with pytest.raises(VisionInputError, match="10000 pixels is above the limit of 5000"):
        processor.images([tmp_path / "big.png"])


def test_unreadable_sources_are_errors(processor, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(VisionInputError, match="not an image PIL can read"):
        processor.images([tmp_path / "notes.png"])
    with pytest.raises(VisionInputError, match="no such file"):
        processor.images([tmp_path / "missing.jpg"])
    with pytest.raises(VisionInputError, match="URLs are not fetched"):
        processor.images(["https://example.com/cat.png"])
    with pytest.raises(VisionInputError, match="cannot read an image from a list"):
        processor.images([[1, 2]])


def test_aspect_ratio_above_200_is_an_error(processor):
    with pytest.raises(VisionInputError, match="aspect ratio of 201"):
        processor.images([Image.new("RGB", (10, 2010))])


def test_data_url_image(processor, checkpoint, tmp_path):
    import base64

    image = Image.fromarray(noise(50, 70))
    image.save(tmp_path / "x.png")
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "x.png").read_bytes()).decode()
    assert_images_equal(processor.images([url]), reference_images(checkpoint, [image]))


# --- videos ----------------------------------------------------------------------------------


def frame_pixels(index: int, width=64, height=48) -> np.ndarray:
    """A frame whose content says its index (a gradient shifted by it) and survives mpeg4."""
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 3 + y * 2 + index * 20) % 256
    return np.stack(
        [base, (base + 85) % 256, np.full_like(base, index * 12 % 256)], axis=-1
    ).astype(np.uint8)


def write_video(path, frames: int, fps: int):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(index), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def decoded_frames(path) -> list[np.ndarray]:
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def naive_video_patches(frames: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """transformers' PIL-path transforms per frame, then patches by explicit index loops in
    the order (group, block row, block col, row, col), each vector (C, Tp, 16, 16)."""
    pixels = [
        normalize(
            rescale(
                resize(frame, (height, width), resample=3, input_data_format="channels_last"),
                1 / 255,
            ),
            [0.5] * 3,
            [0.5] * 3,
            input_data_format="channels_last",
        )
        for frame in frames
    ]
    pixels += pixels[-1:] * (len(pixels) % 2)
    patches = []
    for group in range(len(pixels) // 2):
        pair = np.stack(pixels[2 * group : 2 * group + 2])  # [Tp, H, W, C]
        for block_row in range(height // 32):
            for block_col in range(width // 32):
                for r in range(2):
                    for c in range(2):
                        row, col = 2 * block_row + r, 2 * block_col + c
                        patch = pair[:, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16]
                        patches.append(patch.transpose(3, 0, 1, 2).reshape(-1))
    return np.stack(patches)


def assert_video(video: VideoInputs, frames, grid, timestamps):
    assert video.grid_thw.tolist() == [grid]
    assert video.timestamps == pytest.approx(timestamps, abs=1e-9)
    expected = naive_video_patches(frames, grid[1] * 16, grid[2] * 16)
    assert relative_error(video.pixel_values, expected) <= 1e-6


def test_video_file_sampling_timestamps_and_patches(processor, tmp_path):
    write_video(tmp_path / "clip.mp4", frames=16, fps=8)
    frames = decoded_frames(tmp_path / "clip.mp4")
    video = processor.video(tmp_path / "clip.mp4")
    # 16 frames at 8 fps = 2 s -> 4 frames at 2 fps: linspace(0, 15, 4) = 0, 5, 10, 15;
    # 64×48 rounds to 64×64 (4·64·64 is inside [4096, 25165824]); groups (0,5) and (10,15)
    assert_video(
        video,
        [frames[i] for i in (0, 5, 10, 15)],
        [2, 4, 4],
        [(0 + 5 / 8) / 2, (10 / 8 + 15 / 8) / 2],
    )


def test_short_video_takes_min_frames(processor, tmp_path):
    write_video(tmp_path / "short.mp4", frames=6, fps=24)
    frames = decoded_frames(tmp_path / "short.mp4")
    # int(6/24·2) = 0 -> min_frames 4: linspace(0, 5, 4) = 0, 1.67, 3.33, 5 -> 0, 2, 3, 5
    assert_video(
        processor.video(tmp_path / "short.mp4"),
        [frames[i] for i in (0, 2, 3, 5)],
        [2, 4, 4],
        [(0 + 2 / 24) / 2, (3 / 24 + 5 / 24) / 2],
    )


def test_frame_directory_in_natural_order_with_padding(processor, tmp_path):
    frames = [frame_pixels(i) for i in range(5)]
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"frame{index * 5}.png")  # frame5 < frame10
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "notes.txt").write_text("not a frame")
    # 5 frames at 1 fps -> int(5·2) = 10, capped at 5: all kept, the last repeated to 6
    video = processor.video(tmp_path, source_fps=1)
    assert_video(video, frames, [3, 4, 4], [0.5, 2.5, 4.0])


def test_frame_directory_default_rate_is_the_sampling_rate(processor, tmp_path):
    for index in range(6):
        Image.fromarray(frame_pixels(index)).save(tmp_path / f"{index:03d}.jpg")
    video = processor.video(tmp_path)
    assert video.grid_thw.tolist() == [[3, 4, 4]]
    assert video.timestamps == pytest.approx([0.25, 1.25, 2.25])


def test_gif_frame_delays_are_the_clock(processor, tmp_path):
    frames = [frame_pixels(i) for i in range(6)]
    delays = [100, 300, 100, 500, 200, 100]  # ms; starts 0, .1, .4, .5, 1.0, 1.2; total 1.3 s
    Image.fromarray(frames[0]).save(
        tmp_path / "anim.gif",
        save_all=True,
        duration=delays,
        append_images=[Image.fromarray(f) for f in frames[1:]],
        loop=0,
        disposal=1,
    )
    reference = []
    with Image.open(tmp_path / "anim.gif") as gif:
        for index in range(gif.n_frames):
            gif.seek(index)
            reference.append(np.asarray(gif.convert("RGB")))
    # int(1.3 s · 2) = 2 -> min_frames 4: linspace(0, 5, 4) -> 0, 2, 3, 5
    video = processor.video(tmp_path / "anim.gif")
    assert_video(
        video, [reference[i] for i in (0, 2, 3, 5)], [2, 4, 4], [(0 + 0.4) / 2, (0.5 + 1.2) / 2]
    )


def test_max_frames_and_video_pixel_bounds(checkpoint, tmp_path):
    write_video(tmp_path / "clip.mp4", frames=20, fps=4)
    processor = Processor.from_pretrained(
        checkpoint, fps=4, max_frames=6, video_max_pixels=6 * 32 * 32
    )
    frames = decoded_frames(tmp_path / "clip.mp4")
    # 20 frames at 4 fps sampled at 4 fps -> 20, capped at 6: linspace(0, 19, 6).round();
    # 6·64·64 > 6·32·32 -> beta = sqrt(6·48·64 / 6144) = 1.732, 48/β -> 32, 64/β -> 32
    indices = [0, 4, 8, 11, 15, 19]
    assert_video(
        processor.video(tmp_path / "clip.mp4"),
        [frames[i] for i in indices],
        [3, 2, 2],
        [(indices[g] + indices[g + 1]) / 8 for g in (0, 2, 4)],
    )


def test_expand_writes_timestamped_groups_and_pads(processor):
    video = VideoInputs(
        pixel_values=np.zeros((2 * 4 * 6, 1536), np.float32),
        grid_thw=np.array([[2, 4, 6]]),
        timestamps=[0.25, 1.75],
    )
    grid = np.array([[1, 2, 4]])
    text = processor.expand(f"a {IMAGE} b {VIDEO} c", image_grid_thw=grid, videos=[video])
    pads = "<|video_pad|>" * 6
    assert text == (
        "a <|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|> b "
        f"<0.2 seconds><|vision_start|>{pads}<|vision_end|>"
        f"<1.8 seconds><|vision_start|>{pads}<|vision_end|> c"
    )


def test_placeholder_count_mismatches_are_errors(processor):
    grid = np.array([[1, 2, 2]])
    video = VideoInputs(np.zeros((4, 1536), np.float32), np.array([[1, 2, 2]]), [0.0])
    with pytest.raises(VisionInputError, match="2 <\\|image_pad\\|> placeholder.* 1 image"):
        processor.expand(IMAGE * 2, image_grid_thw=grid)
    with pytest.raises(VisionInputError, match="1 <\\|image_pad\\|> placeholder.* 0 image"):
        processor.expand(IMAGE)
    with pytest.raises(VisionInputError, match="0 .*placeholder.* 1 video"):
        processor.expand("no video here", videos=[video])
    with pytest.raises(VisionInputError, match="outside"):
        processor.expand("<|video_pad|>", videos=[video])


# --- bad videos ------------------------------------------------------------------------------


def test_undecodable_videos_are_errors(processor, tmp_path):
    pytest.importorskip("av")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    for name in ("empty.mp4", "garbage.mp4"):
        with pytest.raises(VisionInputError, match="no decodable video frames"):
            processor.video(tmp_path / name)


def test_bad_video_sources_are_errors(processor, tmp_path):
    (tmp_path / "frames").mkdir()
    with pytest.raises(VisionInputError, match="holds no image files"):
        processor.video(tmp_path / "frames")
    Image.new("RGB", (40, 40)).save(tmp_path / "still.png")
    with pytest.raises(VisionInputError, match="still image"):
        processor.video(tmp_path / "still.png")
    with pytest.raises(VisionInputError, match="no such file"):
        processor.video(tmp_path / "missing.mp4")


def test_video_file_without_pyav_names_the_extra(processor, tmp_path, monkeypatch):
    write_video(tmp_path / "clip.mp4", frames=4, fps=4)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(VisionInputError, match=r'pip install "qwen35-mlx\[video\]"'):
        processor.video(tmp_path / "clip.mp4")


def test_mixed_frame_sizes_are_an_error(processor, tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "1.png")
    Image.new("RGB", (48, 64)).save(tmp_path / "2.png")
    with pytest.raises(VisionInputError, match="share one size"):
        processor.video(tmp_path, source_fps=2)


def test_frame_folder_rate_set_per_load(checkpoint, tmp_path):
    frames = [frame_pixels(i) for i in range(5)]
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"frame{index}.png")
    processor = Processor.from_pretrained(checkpoint, source_fps=1)
    # as the per-call rate above: 5 frames at 1 fps, all kept, the last repeated to 6
    assert_video(processor.video(tmp_path), frames, [3, 4, 4], [0.5, 2.5, 4.0])
    with pytest.raises(VisionInputError, match="source_fps must be positive"):
        Processor.from_pretrained(checkpoint, source_fps=0)
    with pytest.raises(VisionInputError, match=r"unknown processor setting\(s\) \['fsp'\]"):
        Processor.from_pretrained(checkpoint, fsp=1)


@pytest.mark.parametrize("fps", [0, -1, float("nan"), "2"])
def test_bad_video_rates_are_errors(processor, tmp_path, fps):
    Image.fromarray(frame_pixels(0)).save(tmp_path / "0.png")
    with pytest.raises(VisionInputError, match="a video's fps must be a positive number"):
        processor.video(tmp_path, source_fps=fps)


def write_gif(path, frames: int, side: int) -> None:
    images = [Image.new("L", (side, side), 50 * (index % 2)) for index in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100)


def test_animation_too_large_to_decode_is_refused_before_decoding(processor, tmp_path, monkeypatch):
    write_gif(tmp_path / "bomb.gif", frames=12, side=100)  # 120,000 pixels to decode
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # each frame is under it
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or load(self))
    with pytest.raises(
        VisionInputError,
        match=r"12 frames of 100×100 = 120000 pixels to decode "
        r"is above 4 × the limit of 20000",
    ):
        processor.video(tmp_path / "bomb.gif")
    assert decoded == []  # refused from the header, no frame decoded
    monkeypatch.setattr("qwen35_mlx.sources.MAX_ANIMATION_FRAMES", 11)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(VisionInputError, match="has 12 frames, more than the 11"):
        processor.video(tmp_path / "bomb.gif")
