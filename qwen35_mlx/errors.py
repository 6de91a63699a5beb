"""Errors about checkpoints, shared by the loader and the tokenizer (which the loader imports)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the file at fault and what to do."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs is absent; also a FileNotFoundError, as callers may catch."""
