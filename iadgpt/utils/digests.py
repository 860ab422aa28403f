"""SHA-256 digests of files and model folders: what decides whether saved work may be reused."""

from __future__ import annotations

import hashlib
from pathlib import Path

RUN_LOGS = frozenset({"metrics.jsonl", "train_summary.json"})
"""Files a training run writes beside its model that do not change what the model computes."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def model_sha256(folder: str | Path) -> str:
    """Hex SHA-256 over the name and content of every file at the top of a model folder: the weights
    (`*.safetensors`), `config.json` (with the IADGPT settings), processor, tokenizer and chat
    template. Hidden files and training logs (RUN_LOGS) are left out; sub-folders (a run's
    checkpoints/ and tb/) are not part of the model."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in RUN_LOGS:
            digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()
