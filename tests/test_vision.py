"""The vision tower, M-RoPE positions and multimodal logits against transformers, float32.

Tiny checkpoints (tests/checkpoints.py VISION: a 4x4 learned position grid, so every grid here
resamples it). Prompts are built as the processor writes them: an image is
`<|vision_start|>` + (h/2)(w/2) `<|image_pad|>` + `<|vision_end|>`; a video writes each temporal
group as `<timestamp text><|vision_start|><|video_pad|>...<|vision_end|>`.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from qwen35_mlx.loading import load_model

from checkpoints import VISION, VISION_IDS, Spec
from metrics import relative_error

CONDITIONAL = Spec(layout="conditional")
START, END = VISION_IDS["vision_start_token_id"], VISION_IDS["vision_end_token_id"]
IMAGE, VIDEO = VISION_IDS["image_token_id"], VISION_IDS["video_token_id"]
PATCH_DIM = 3 * 2 * 16 * 16  # C * Tp * P * P
MERGE = VISION["spatial_merge_size"]

# (kind, grid or text length) in prompt order
PROMPTS = {
    "one-image": [("text", 5), ("image", (1, 4, 6)), ("text", 7)],
    "two-images": [
        ("text", 3),
        ("image", (1, 4, 6)),
        ("text", 4),
        ("image", (1, 6, 4)),
        ("text", 6),
    ],
    "video": [("text", 4), ("video", (2, 4, 4)), ("text", 5)],
    "image-and-video": [
        ("text", 2),
        ("video", (2, 6, 4)),
        ("text", 3),
        ("image", (1, 2, 8)),
        ("text", 4),
    ],
}


def build(parts, seed=0):
    """-> (input_ids [1, T], image grids, video grids, image pixels, video pixels)."""
    rng = np.random.default_rng(seed)
    ids, grids = [], {"image": [], "video": []}

    def text(n):
        ids.extend(rng.integers(0, 496, size=n).tolist())

    for kind, value in parts:
        if kind == "text":
            text(value)
            continue
        t, h, w = value
        grids[kind].append(value)
        per_group = h * w // MERGE**2
        if kind == "image":
            ids.extend([START] + [IMAGE] * per_group + [END])
        for _ in range(t if kind == "video" else 0):
            text(3)  # the "<0.5 seconds>" timestamp
            ids.extend([START] + [VIDEO] * per_group + [END])
    pixels = {
        kind: (
            rng.standard_normal((sum(t * h * w for t, h, w in g), PATCH_DIM)).astype(np.float32)
            if g
            else None
        )
        for kind, g in grids.items()
    }
    return (
        np.array([ids]),
        np.array(grids["image"]).reshape(-1, 3),
        np.array(grids["video"]).reshape(-1, 3),
        pixels["image"],
        pixels["video"],
    )


def token_types(ids):
    return torch.tensor((ids == IMAGE) * 1 + (ids == VIDEO) * 2)


def reference_logits(reference, ids, image_grid, video_grid, image_pixels, video_pixels):
    kwargs = {}
    if len(image_grid):
        kwargs.update(
            pixel_values=torch.tensor(image_pixels), image_grid_thw=torch.tensor(image_grid)
        )
    if len(video_grid):
        kwargs.update(
            pixel_values_videos=torch.tensor(video_pixels), video_grid_thw=torch.tensor(video_grid)
        )
    with torch.no_grad():
        return reference(
            input_ids=torch.tensor(ids), mm_token_type_ids=token_types(ids), **kwargs
        ).logits.numpy()


def multimodal_inputs(model, ids, image_grid, video_grid, image_pixels, video_pixels):
    """(input embeddings, position ids, rope delta) as generation prepares a prompt."""
    image = model.encode_vision(mx.array(image_pixels), image_grid) if len(image_grid) else None
    video = model.encode_vision(mx.array(video_pixels), video_grid) if len(video_grid) else None
    embeddings = model.embed_inputs(mx.array(ids), image, video)
    positions, delta = model.position_ids(
        mx.array(ids),
        image_grid if len(image_grid) else None,
        video_grid if len(video_grid) else None,
    )
    return embeddings, positions, delta


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    directory, reference = make_checkpoint(CONDITIONAL)
    return load_model(directory), reference


GRIDS = {
    "one-image": [[1, 4, 6]],
    "two-images": [[1, 4, 6], [1, 6, 4]],
    "video": [[2, 4, 4]],
    "tall-thin": [[1, 8, 2]],
}


@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
def test_vision_features_match_transformers(tiny, grids):
    model, reference = tiny
    patches = sum(t * h * w for t, h, w in grids)
    pixels = np.random.default_rng(1).standard_normal((patches, PATCH_DIM)).astype(np.float32)
    ours = np.array(model.encode_vision(mx.array(pixels), grids))
    with torch.no_grad():
        expected = reference.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids))
    assert ours.shape == (patches // MERGE**2, 64)
    assert relative_error(ours, expected.pooler_output.numpy()) <= 1e-4


@pytest.mark.parametrize("name", PROMPTS)
def test_position_ids_match_transformers(tiny, name):
    model, reference = tiny
    ids, image_grid, video_grid, _, _ = build(PROMPTS[name])
    positions, delta = model.position_ids(
        mx.array(ids),
        image_grid if len(image_grid) else None,
        video_grid if len(video_grid) else None,
    )
    expected, expected_delta = reference.model.get_rope_index(
        torch.tensor(ids),
        token_types(ids),
        image_grid_thw=torch.tensor(image_grid) if len(image_grid) else None,
        video_grid_thw=torch.tensor(video_grid) if len(video_grid) else None,
    )
    assert np.array_equal(np.array(positions), expected.numpy())
    assert np.array_equal(np.array(delta), expected_delta.numpy().reshape(-1))


def test_batched_position_ids_match_transformers(tiny):
    # grids are consumed across the batch in order, row after row
    model, reference = tiny
    first, second = build(PROMPTS["one-image"]), build(PROMPTS["two-images"], seed=1)
    length = max(first[0].shape[1], second[0].shape[1])
    pad = [
        np.concatenate([p[0], np.full((1, length - p[0].shape[1]), 7)], axis=1)
        for p in (first, second)
    ]
    ids, grids = np.concatenate(pad), np.concatenate([first[1], second[1]])
    positions, delta = model.position_ids(mx.array(ids), grids)
    expected, expected_delta = reference.model.get_rope_index(
        torch.tensor(ids), token_types(ids), image_grid_thw=torch.tensor(grids)
    )
    assert np.array_equal(np.array(positions), expected.numpy())
    assert np.array_equal(np.array(delta), expected_delta.numpy().reshape(-1))


LOGIT_CASES = [(name, CONDITIONAL) for name in PROMPTS] + [
    ("one-image", Spec(layout="conditional", rope_type="yarn"))
]


@pytest.mark.parametrize(
    "name, spec", LOGIT_CASES, ids=[f"{n}-{s.rope_type}" for n, s in LOGIT_CASES]
)
def test_logits_match_transformers(make_checkpoint, name, spec):
    directory, reference = make_checkpoint(spec)
    model = load_model(directory)
    inputs = build(PROMPTS[name])
    embeddings, positions, _ = multimodal_inputs(model, *inputs)
    ours = np.array(model(mx.array(inputs[0]), input_embeddings=embeddings, position_ids=positions))
    assert relative_error(ours, reference_logits(reference, *inputs)) <= 1e-4


def test_bfloat16_stays_close_to_float32(tiny, make_checkpoint):
    model, _ = tiny
    half = load_model(make_checkpoint(CONDITIONAL)[0], dtype="bfloat16")
    inputs = build(PROMPTS["image-and-video"])
    features = half.encode_vision(mx.array(inputs[3]), inputs[1])
    assert features.dtype == mx.bfloat16  # no float32 promotion inside the tower
    full = np.array(model.encode_vision(mx.array(inputs[3]), inputs[1]))
    assert relative_error(np.array(features.astype(mx.float32)), full) <= 2e-2
    logits = {}
    for name, m in (("half", half), ("full", model)):
        embeddings, positions, _ = multimodal_inputs(m, *inputs)
        out = m(mx.array(inputs[0]), input_embeddings=embeddings, position_ids=positions)
        logits[name] = np.array(out.astype(mx.float32))
    assert relative_error(logits["half"], logits["full"]) <= 2e-2


@pytest.mark.parametrize("splits", [[None], [9, None]], ids=["one-prefill", "chunked-prefill"])
def test_prefill_then_decode_matches_full_forward(tiny, splits):
    # the last 6 tokens are decoded one by one at cache offset + rope_delta
    model, _ = tiny
    ids, image_grid, video_grid, image_pixels, video_pixels = build(
        [("text", 5), ("image", (1, 4, 6)), ("text", 3), ("video", (2, 4, 4)), ("text", 8)]
    )
    embeddings, positions, delta = multimodal_inputs(
        model, ids, image_grid, video_grid, image_pixels, video_pixels
    )
    full = np.array(model(mx.array(ids), input_embeddings=embeddings, position_ids=positions))
    prompt = ids.shape[1] - 6
    cache, pieces, start = model.make_cache(), [], 0
    for size in splits:
        end = prompt if size is None else start + size
        pieces.append(
            model(
                mx.array(ids[:, start:end]),
                cache=cache,
                input_embeddings=embeddings[:, start:end],
                position_ids=positions[:, :, start:end],
            )
        )
        start = end
    for t in range(prompt, ids.shape[1]):
        pieces.append(model(mx.array(ids[:, t : t + 1]), cache=cache, rope_delta=delta))
    assert np.array(delta).item() < 0  # the vision tokens do take fewer positions
    assert relative_error(np.concatenate([np.array(p) for p in pieces], axis=1), full) <= 1e-5


@pytest.mark.parametrize("extra", [1, -1], ids=["more-placeholders", "more-features"])
def test_placeholder_feature_mismatch_is_an_error(tiny, extra):
    model, _ = tiny
    ids, image_grid, _, pixels, _ = build(PROMPTS["one-image"])
    features = model.encode_vision(mx.array(pixels), image_grid)  # 6 features
    ids = np.concatenate([ids, [[IMAGE]]], axis=1) if extra > 0 else ids
    features = features if extra > 0 else mx.concatenate([features, features[:1]])
    counts = (7, 6) if extra > 0 else (6, 7)
    with pytest.raises(
        ValueError, match=f"{counts[0]} image placeholder tokens but {counts[1]} image features"
    ):
        model.embed_inputs(mx.array(ids), features)


def test_bad_vision_input_is_an_error(tiny, make_checkpoint):
    model, _ = tiny
    with pytest.raises(ValueError, match="needs \\(24, 1536\\)"):
        model.encode_vision(mx.zeros((20, PATCH_DIM)), [[1, 4, 6]])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        model.encode_vision(mx.zeros((15, PATCH_DIM)), [[1, 3, 5]])
    with pytest.raises(ValueError, match="needs 6 placeholder tokens but the run"):
        model.position_ids(mx.array([[1, START, IMAGE, IMAGE, END]]), [[1, 4, 6]])
    text_only = load_model(make_checkpoint(Spec())[0])
    assert text_only.vision_tower is None
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.encode_vision(mx.zeros((24, PATCH_DIM)), [[1, 4, 6]])
