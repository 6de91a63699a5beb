"""The released Qwen3.5 processor files, for test checkpoints.

preprocessor_config.json and video_preprocessor_config.json hold what every Qwen3.5 size ships
(docs/ARCHITECTURE.md §5); the canonical dicts live in qwen35_mlx.processor, which falls back to
them when a checkpoint has no such files.
"""

import json
from pathlib import Path

from qwen35_mlx.processor import PROCESSOR_FILES


def write_processor_files(directory: Path) -> None:
    """Write preprocessor_config.json and video_preprocessor_config.json into `directory`."""
    for name, content in PROCESSOR_FILES.items():
        (Path(directory) / name).write_text(json.dumps(content, indent=2) + "\n")
