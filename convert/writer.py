"""Writing a checkpoint so that no interruption leaves a folder that looks complete.

Everything goes into `.NAME.incomplete` beside the target, config.json last (a folder without
it is not a checkpoint), and the folder is renamed into place only once whole.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx

from qwen35_mlx.loading import CheckpointError, is_converted

MLX_METADATA = {"format": "mlx"}
SHARD_BYTES = 5 << 30  # mlx-lm's limit too, so both tools cut a model into the same files
# Files a checkpoint carries besides config and weights, copied when the source has them.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "LICENSE",
)
HEADROOM = 1.05  # safetensors headers, JSON files, model card


class WriteError(OSError):
    """The checkpoint could not be written; nothing was left at the target."""


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.incomplete"


def check_target(target: Path, force: bool) -> None:
    """An existing target is replaced only with `force`, and only if losing it loses no data:
    an empty folder or a converted checkpoint (what this tool writes)."""
    if not target.exists():
        return
    if not force:
        raise FileExistsError(
            f"{target} already exists; choose another --mlx-path or pass --force to replace it"
        )
    if not replaceable(target):
        raise FileExistsError(
            f"{target} exists and is not a converted MLX checkpoint (config.json and safetensors "
            "marked {'format': 'mlx'}); --force only replaces one of those. Choose another "
            f"--mlx-path, or move or delete {target} yourself"
        )


def replaceable(target: Path) -> bool:
    if not target.is_dir():
        return False
    if not any(target.iterdir()):
        return True
    try:
        return (target / "config.json").is_file() and is_converted(target)
    except CheckpointError:  # no weights, or an unreadable shard: not ours to delete
        return False


def check_free_space(target: Path, nbytes: int) -> None:
    parent = target.resolve().parent
    # ask the nearest existing folder: creating `parent` here would leave it behind on failure
    existing = next(folder for folder in (parent, *parent.parents) if folder.exists())
    free = shutil.disk_usage(existing).free
    if free < nbytes * HEADROOM:
        raise WriteError(
            errno.ENOSPC,
            f"writing the checkpoint needs {nbytes * HEADROOM / 1e6:,.1f} MB but "
            f"{parent} has {free / 1e6:,.1f} MB free; free some space or choose another --mlx-path",
        )


def write_checkpoint(
    target: Path,
    weights: dict[str, mx.array],
    config: dict,
    source: Path,
    model_card: str,
    force: bool = False,
) -> None:
    """Writes weights (sharded safetensors + index), config, side files and card to `target`.

    Consumes `weights`: each shard's tensors leave the dict as the shard is written, so that
    with lazy arrays (the caller holding no other reference) memory holds one shard at a time.
    """
    check_target(target, force)
    check_free_space(target, sum(v.nbytes for v in weights.values()))
    staging = staging_dir(target)
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        _write_weights(staging, weights)
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        (staging / "README.md").write_text(model_card)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _move_into_place(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise WriteError(
                errno.ENOSPC,
                f"the disk filled up while writing {target}; "
                "nothing was left there. Free some space and run again",
            ) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names per file, in order: a new file whenever the next tensor would take the
    current one past `max_bytes` (a larger tensor gets a file of its own)."""
    shards, size = [], 0
    for name, nbytes in sizes.items():
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(directory: Path, weights: dict[str, mx.array]) -> None:
    total_size = sum(v.nbytes for v in weights.values())  # nbytes needs no evaluation
    shards = plan_shards({name: v.nbytes for name, v in weights.items()}, SHARD_BYTES)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: weights.pop(name) for name in names}
        for value in shard.values():
            mx.eval(value)  # one at a time: each source tensor is freed once its output exists
        mx.save_safetensors(str(directory / file), shard, metadata=MLX_METADATA)
        del shard  # its tensors are freed here, before the next shard is computed
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.parent / f".{target.name}.replaced"
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(target, retired)  # --force: the old folder goes only once the new one is whole
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
