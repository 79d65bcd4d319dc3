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
from typing import Optional

from .tracking import METRICS_FILE

LOCK_FILE = ".lock"
NOT_CHANGED, DELETED, REPLACED = 0, 1, 2  # what became of run.dir while the run held its lock


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
    try:
        _inspect(run_dir)
    except OSError as e:  # a name longer than the file system allows, a loop of links, ...
        raise RunDirError(f"run.dir: {run_dir} cannot be used: {_reason(e)}") from None


def _inspect(run_dir: Path) -> None:
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


def run_dir_lost(run_dir: Path, change: int, step: int, newest_checkpoint: Optional[int]) -> RunDirError:
    """The error every rank raises once rank 0 has seen run.dir deleted or replaced under the run."""
    what = "was deleted" if change == DELETED else "was replaced by another directory"
    saved = f"the checkpoints written there (the newest at step {newest_checkpoint})" if newest_checkpoint else \
        "(no checkpoint had been written yet)"
    return RunDirError(f"run.dir: {run_dir} {what} while the run was training (noticed at step {step}): its "
                       f"{METRICS_FILE}, train.log, config.yaml and lock are gone from there, and {saved}; the run "
                       "stopped rather than go on writing where nobody will find it")


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
        self._identity: Optional[tuple[int, int]] = None  # (device, inode) of run.dir when it was locked

    def acquire(self) -> "RunDirLock":
        try:
            return self._acquire()
        except OSError as e:  # a name longer than the file system allows, a loop of links, ...
            raise RunDirError(f"run.dir: {self.run_dir} cannot be used: {_reason(e)}") from None

    def _acquire(self) -> "RunDirLock":
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
        st = os.stat(run_dir)
        self._identity = (st.st_dev, st.st_ino)
        return self

    def change(self) -> int:
        """NOT_CHANGED, DELETED (nothing at the path now) or REPLACED (another directory there)."""
        try:
            st = os.stat(self.run_dir)
        except FileNotFoundError:
            return DELETED
        except OSError:
            return NOT_CHANGED  # cannot tell (a flaky network file system): carry on
        return NOT_CHANGED if (st.st_dev, st.st_ino) == self._identity else REPLACED

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
