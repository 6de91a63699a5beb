"""Helpers shared by the test modules: private checkpoint copies, file hashes, tensor edits."""

import hashlib
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

from checkpoints import Spec


def copy_checkpoint(make_checkpoint, tmp_path, spec=Spec()) -> Path:
    """A private copy of a session fixture, safe to corrupt."""
    source, _ = make_checkpoint(spec)
    return Path(shutil.copytree(source, tmp_path / "checkpoint"))


def contents(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `directory`."""
    return {
        str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def rewrite_weights(file: Path, edit) -> None:
    """Rewrites a safetensors file with `edit(tensors)` applied, keeping its metadata."""
    tensors, metadata = mx.load(str(file), return_metadata=True)
    mx.eval(tensors)  # read everything before the file is overwritten
    edit(tensors)
    mx.save_safetensors(str(file), tensors, metadata=metadata)


def prompt(length=100, batch=1, seed=0) -> np.ndarray:
    """Random ids [batch, length] below the tiny tokenizer's special tokens (100 by default:
    longer than transformers' 64-token chunk)."""
    return np.random.default_rng(seed).integers(0, 496, size=(batch, length))


def reference_logits(torch_model, ids) -> np.ndarray:
    """transformers' logits [B, T, vocab] in float32."""
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.float().numpy()
