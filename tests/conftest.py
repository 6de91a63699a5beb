import pytest

from checkpoints import Spec, write_checkpoint
from mtp_training import train_mtp_checkpoint


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(Spec(...)) -> (directory, transformers model), built once per session."""
    built = {}

    def make(spec: Spec = Spec()):
        if spec not in built:
            directory = tmp_path_factory.mktemp(spec.id)
            built[spec] = (directory, write_checkpoint(spec, directory))
        return built[spec]

    return make


@pytest.fixture(scope="session")
def trained_mtp_checkpoint(make_checkpoint, tmp_path_factory):
    """trained_mtp_checkpoint(Spec(...)) -> the tiny float32 checkpoint of that spec with an MTP
    head trained to draft its greedy continuations (tests/mtp_training.py), built once per
    session; `load()` gives a model whose `mtp` is trained."""
    built = {}

    def train(spec: Spec = Spec()):
        if spec not in built:
            source, _ = make_checkpoint(spec)
            target = tmp_path_factory.mktemp(f"trained-mtp-{spec.id}") / "checkpoint"
            built[spec] = train_mtp_checkpoint(source, target, spec)
        return built[spec]

    return train
