"""A model loaded on one thread serves another: every array it holds is evaluated at load, or
(the vision tower, read on first use) built again on the thread that first uses it."""

import threading

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten
from PIL import Image

from qwen35_mlx import generate, load

from checkpoints import Spec
from metrics import relative_error


def on_a_thread(work):
    """work()'s result, run on a new thread; re-raises its exception here."""
    outcome = {}

    def run():
        try:
            outcome["result"] = work()
        except Exception as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_text_model_runs_on_another_thread(make_checkpoint):
    directory, reference = make_checkpoint(Spec())
    model, tokenizer = load(directory)
    ids = np.random.default_rng(0).integers(0, 496, size=(1, 40))
    # first use on the worker: nothing the model holds may be a lazy main-thread array
    logits = on_a_thread(lambda: np.array(model(mx.array(ids))))
    answer = on_a_thread(lambda: generate(model, tokenizer, "Hello there", max_tokens=8).text)
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.float().numpy()
    assert relative_error(logits, expected) <= 1e-4
    assert np.array_equal(logits, np.array(model(mx.array(ids))))
    assert answer == generate(model, tokenizer, "Hello there", max_tokens=8).text


def test_vision_tower_first_used_on_another_thread(make_checkpoint, tmp_path):
    directory, reference = make_checkpoint(Spec(layout="conditional"))
    image = tmp_path / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)

    def describe(model, tokenizer):
        return generate(model, tokenizer, "What is it?", images=[image], max_tokens=8).text

    model, tokenizer = load(directory)
    on_thread = on_a_thread(lambda: describe(model, tokenizer))
    assert on_thread == describe(*load(directory))  # a fresh model, first used here
    # the weights the worker read are the checkpoint's (Conv3d channels-last, as loaded)
    expected = {k: v.numpy() for k, v in reference.model.visual.state_dict().items()}
    expected["patch_embed.proj.weight"] = expected["patch_embed.proj.weight"].transpose(
        0, 2, 3, 4, 1
    )
    loaded = dict(tree_flatten(model.vision_tower.parameters()))
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert np.array_equal(np.array(loaded[name]), value), name
