"""Uploading a converted checkpoint to the Hugging Face hub: its own files only, once checked."""

from __future__ import annotations

from pathlib import Path

from qwen35_mlx.loading import CheckpointError, is_converted, load_model, weight_files

from .writer import SIDE_FILES

# What a checkpoint consists of besides its shards; nothing else in the folder is uploaded
# (a stray .env or key file, notes, older shards not in the index).
CHECKPOINT_FILES = ("config.json", "model.safetensors.index.json", "README.md", *SIDE_FILES)


def upload(path: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Checks that `path` is a converted checkpoint that loads, creates `repo_id` if needed and
    uploads the checkpoint's files (config, shards and index, tokenizer, processor and template
    files, model card) in one commit. Returns the repo's URL."""
    path = Path(path)
    files = checkpoint_files(path)
    from huggingface_hub import HfApi  # only needed here

    api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(path),
        repo_type="model",
        allow_patterns=files,
        commit_message="Upload MLX checkpoint (qwen35-mlx)",
    )
    url = f"https://huggingface.co/{repo_id}"
    print(f"[upload] {len(files)} files of {path} -> {url}")
    return url


def checkpoint_files(path: Path) -> list[str]:
    """The names of the checkpoint's files under `path`, after checking that it loads: config,
    every shard's header, and tensor names and shapes against the model (no tensor data is
    read). Raises ValueError naming the problem otherwise."""
    if not (path / "config.json").is_file() or not _marked_mlx(path):
        raise ValueError(f"{path} is not a converted checkpoint; run `qwen35-mlx convert` first")
    try:
        load_model(path, lazy=True)
    except CheckpointError as error:
        raise CheckpointError(f"{error}. Not uploaded: convert the checkpoint again") from None
    shards = [file.name for file in weight_files(path)]
    return sorted(shards + [name for name in CHECKPOINT_FILES if (path / name).is_file()])


def _marked_mlx(path: Path) -> bool:
    try:
        return is_converted(path)
    except CheckpointError:  # no weights at all
        return False
