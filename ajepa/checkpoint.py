"""Atomic checkpoints: written to a temporary file in the same folder, then renamed into place.

A run folder keeps its last K checkpoints as `checkpoint-<step>.pt` and `checkpoint.pt`, a hard
link to the newest one (a copy where the filesystem has no hard links). Every file is written
under a temporary name and renamed into place, so a kill at any moment, even mid-save, leaves
every checkpoint that already existed intact; the only debris is a `.*.tmp` file, removed on
the next start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

FORMAT_VERSION = 1
# The numpy pieces a training checkpoint's RNG state needs; nothing else may be unpickled.
_NUMPY_SAFE = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]
# What `--resume` needs from a training checkpoint.
TRAINING_KEYS = ("step", "config", "model", "optimizer")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(fh)` on a temporary file beside `path`, then rename it into place: a reader sees the
    old file or the new one, never half. The temporary file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` atomically (`atomic_write`)."""
    return atomic_write(path, lambda fh: torch.save({"format_version": FORMAT_VERSION, **state}, fh))


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith("Check the documentation")]
    return lines[-1] if lines else repr(exc)


def load_checkpoint(path: str | Path, map_location="cpu", require: tuple[str, ...] = ()) -> dict:
    """Load an ajepa checkpoint with ``torch.load(weights_only=True)``: tensors, plain containers and
    numpy's RNG-state arrays only, so no code in the file can run. Checks the format version and
    that the entries named in `require` are present; every failure is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable ajepa checkpoint ({type(exc).__name__}: {_last_line(exc)})") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if not isinstance(version, int):
        raise ValueError(f"{path}: not an ajepa checkpoint (no format_version)")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {version} is newer than this ajepa understands "
            f"({FORMAT_VERSION}); upgrade ajepa"
        )
    missing = [k for k in require if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks its {', '.join(repr(k) for k in missing)} "
                         f"entr{'y' if len(missing) == 1 else 'ies'}")
    return state


LATEST = "checkpoint.pt"
_STEP_FILE = re.compile(r"^checkpoint-(\d+)\.pt$")
log = logging.getLogger("ajepa")


class CheckpointDir:
    """A run folder's checkpoints: `checkpoint-<step>.pt` (the last `keep_last`; 0 keeps all) and
    `checkpoint.pt`, the newest."""

    def __init__(self, folder: str | Path, keep_last: int = 3):
        self.folder, self.keep_last = Path(folder), keep_last

    @property
    def latest_path(self) -> Path:
        return self.folder / LATEST

    def step_path(self, step: int) -> Path:
        return self.folder / f"checkpoint-{step:08d}.pt"

    def steps(self) -> list[int]:
        """Steps of the numbered checkpoints on disk, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _STEP_FILE.match(p.name)))

    def exists(self) -> bool:
        return self.latest_path.exists() or bool(self.steps())

    def remove_partial(self) -> list[Path]:
        """Delete temporary files left by a save that was killed; returns them."""
        stale = [p for p in self.folder.glob(".checkpoint*.tmp") if p.is_file()] if self.folder.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save(self, state: dict, step: int) -> Path:
        """Write checkpoint-<step>.pt, point checkpoint.pt at it, then drop numbered ones beyond keep_last."""
        path = save_checkpoint(state, self.step_path(step))
        self._link_latest(path)
        if self.keep_last:
            for old in self.steps()[: -self.keep_last]:
                if old != step:
                    self.step_path(old).unlink(missing_ok=True)
        return path

    def _link_latest(self, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{LATEST}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        os.unlink(tmp)
        try:
            try:
                os.link(path, tmp)
            except OSError:  # no hard links here: a copy, still renamed into place atomically
                shutil.copyfile(path, tmp)
            os.replace(tmp, self.latest_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.folder)

    def load_latest(self, map_location="cpu", require: tuple[str, ...] = TRAINING_KEYS) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads, trying numbered ones newest first, then checkpoint.pt.

        Returns None if the folder holds none. A file that fails to load is reported and skipped,
        never deleted.
        """
        candidates = [self.step_path(s) for s in reversed(self.steps())] + [self.latest_path]
        errors = []
        for path in candidates:
            if not path.is_file():
                continue
            try:
                return load_checkpoint(path, map_location, require), path
            except ValueError as exc:
                log.warning("skipping unreadable checkpoint %s (%s)", path, exc)
                errors.append(str(exc))
        if errors:
            raise ValueError(f"{self.folder}: no readable checkpoint ({'; '.join(errors)})")
        return None
