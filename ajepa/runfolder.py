"""A run folder's pieces that are not checkpoints: the JSONL metrics log, the exclusive lock, and the
SIGTERM/SIGINT handler that turns a signal into a save-and-stop."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("ajepa")


class MetricsLog:
    """Append-only JSONL metrics, mirrored to TensorBoard when it is installed."""

    def __init__(self, out: Path, fresh: bool = False):
        """`fresh` starts a new file: a new run never appends to rows another run left."""
        self.path = out / "metrics.jsonl"
        if fresh and self.path.exists():
            log.warning("%s: starting a fresh metrics.jsonl (the one there belonged to a run with no checkpoint)",
                        out)
            self.path.write_text("")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def truncate(self, step: int) -> None:
        """Drop rows after `step` (written by a run that died before its next checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class RunFolderLockedError(FileExistsError):
    """Another live `ajepa train` holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder (`fcntl.flock` on `<out>/.lock`), held for the whole run.

    A second run into the same folder fails at once with a message naming the holder. The kernel
    drops the lock when its holder exits, kill -9 included, so a stale lock never blocks a resume.
    """

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.path = folder / self.NAME
        self._fh = None

    def __enter__(self) -> RunLock:
        import fcntl
        import socket

        fh = open(self.path, "a+")  # noqa: SIM115 (held open for the run)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunFolderLockedError(f"{self.path.parent} is in use by another ajepa train ({holder}); wait for it "
                                       "to finish or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, removed folder); earlier ones are intact."""


class StopSignals:
    """SIGTERM / SIGINT ask the run to stop: it saves a checkpoint at the end of the step and
    returns. A second signal stops at once (KeyboardInterrupt). Only the main thread can install
    handlers; elsewhere this does nothing."""

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt(f"second {self.NAMES.get(signum, signum)}")
        self.received = self.NAMES.get(signum, str(signum))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.NAMES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
