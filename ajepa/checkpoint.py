"""Atomic checkpoints: written to a temporary file in the same folder, then renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format_version": FORMAT_VERSION, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable ajepa checkpoint ({exc})") from exc
    version = state.get("format_version") if isinstance(state, dict) else None
    if version is None:
        raise ValueError(f"{path}: not an ajepa checkpoint (no format_version)")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {version} is newer than this ajepa understands ({FORMAT_VERSION}); upgrade ajepa"
        )
    return state
