"""`run.dir`: one live run per directory, and one clear line when it cannot be used.

A run.dir that holds a run resumes from its latest complete checkpoint (`trainer.run.checkpoint`);
one with metrics but no checkpoint is refused, so nothing trained is overwritten.

The run holds an exclusive `flock` on `run.dir/.lock` for its whole life; the kernel drops
it when the process ends, however it ends, so a crashed run never leaves a stale lock. The
lock file names the holder (host and pid) for the error a second run prints.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from .tracking import METRICS_FILE

LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """`run.dir` cannot be used for this run; the message starts with `run.dir:`."""


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def inspect_run_dir(run_dir: Path) -> None:
    """Refuse, without creating or changing anything, a run.dir this run could not use.

    Used by `python -m trainer check` (which then looks for a checkpoint to resume, as `train`
    does); `RunDirLock.acquire` repeats the checks for real."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir: {run_dir} exists and is not a directory")
    base = _nearest_existing(run_dir)
    if not base.is_dir():
        raise RunDirError(f"run.dir: {run_dir} cannot be created: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunDirError(f"run.dir: {run_dir} cannot be written: {base} is not writable")
    lock_path = run_dir / LOCK_FILE
    if lock_path.exists():
        with open(lock_path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(run_dir, lock_path) from None


def holds_a_run_without_checkpoint(run_dir: Path) -> RunDirError:
    return RunDirError(f"run.dir: {run_dir} already holds a run ({METRICS_FILE} exists) but no complete checkpoint "
                       "to resume from; choose a new run.dir or remove the old one")


def _in_use(run_dir: Path, lock_path: Path) -> RunDirError:
    try:
        holder = lock_path.read_text().strip() or "unknown"
    except OSError:
        holder = "unknown"
    return RunDirError(f"run.dir: {run_dir} is in use by another live run ({holder}); wait for it or choose "
                       "another run.dir")


class RunDirLock:
    """Create `run_dir` if needed and hold its lock until `release` (or process exit)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._file = None

    def acquire(self) -> "RunDirLock":
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"run.dir: {run_dir} exists and is not a directory")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"run.dir: {run_dir} cannot be created: {_reason(e)}") from None
        lock_path = run_dir / LOCK_FILE
        try:
            f = open(lock_path, "a+")
        except OSError as e:
            raise RunDirError(f"run.dir: {run_dir} is not writable: {_reason(e)}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise _in_use(run_dir, lock_path) from None
            raise RunDirError(f"run.dir: {run_dir} cannot be locked: {_reason(e)}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
