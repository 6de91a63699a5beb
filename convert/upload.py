"""Uploading a converted checkpoint to the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

from qwen35_mlx.loading import is_converted


def upload(path: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Creates `repo_id` if needed and uploads the folder (resumable large-folder upload).

    Returns the repo's URL.
    """
    path = Path(path)
    if not (path / "config.json").is_file() or not is_converted(path):
        raise ValueError(f"{path} is not a converted checkpoint; run `qwen35-mlx convert` first")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_large_folder(repo_id=repo_id, folder_path=str(path), repo_type="model")
    url = f"https://huggingface.co/{repo_id}"
    print(f"[upload] {path} -> {url}")
    return url
