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
    """The tiny float32 checkpoint of Spec() with an MTP head trained to draft its greedy
    continuations (tests/mtp_training.py); `load()` gives a model whose `mtp` is trained."""
    source, _ = make_checkpoint(Spec())
    return train_mtp_checkpoint(source, tmp_path_factory.mktemp("trained-mtp") / "checkpoint")
