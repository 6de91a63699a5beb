import pytest

from checkpoints import Spec, write_checkpoint


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
