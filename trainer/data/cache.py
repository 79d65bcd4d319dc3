"""The data cache (`data.cache_dir`): where token shards and trained tokenizers are built once
and then only read.

Whatever builds an entry holds an exclusive `flock` on the entry's lock file while it works,
writes into a temporary name and publishes with one `rename`, so a reader sees a complete
entry or none. Other processes (the other ranks of this machine, another run) wait for the
lock, bounded by `parallel.timeout_s`, and then find the entry published. The kernel drops a
lock when its process ends, however it ends: a crashed builder leaves no stale lock, only a
temporary directory that the next builder removes. Each build appends one line to
`builds.log`, so "built once" can be checked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from .corpus import DataError

BUILDS_LOG = "builds.log"
POLL_S = 0.1


def cache_root(cache_dir: Optional[str]) -> Path:
    """`data.cache_dir`, else $XDG_CACHE_HOME/moe-trainer, else ~/.cache/moe-trainer."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "moe-trainer"


def make_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir: {path} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"data.cache_dir: {path} is not writable (set data.cache_dir to a writable directory)")
    return path


def holder() -> str:
    rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
    return f"pid {os.getpid()}{rank} on {socket.gethostname()}"


@contextlib.contextmanager
def exclusive(lock_path: Path, wait_s: float, what: str) -> Iterator[float]:
    """Hold the lock at `lock_path` for the block; yields the seconds spent waiting for it.
    Waiting longer than `wait_s` (parallel.timeout_s) is a DataError naming the holder."""
    make_dir(lock_path.parent)
    started = time.monotonic()
    with open(lock_path, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise DataError(f"data.cache_dir: cannot lock {lock_path}: {e.strerror or e}") from None
            if time.monotonic() - started > wait_s:
                f.seek(0)
                raise DataError(f"data.cache_dir: waited {wait_s:.0f}s (parallel.timeout_s) for "
                                f"{f.read().strip() or 'another process'}, which is building {what} in "
                                f"{lock_path.parent}; wait for it, or raise parallel.timeout_s") from None
            time.sleep(POLL_S)
        waited = time.monotonic() - started
        f.seek(0)
        f.truncate()
        f.write(holder() + "\n")
        f.flush()
        try:
            yield waited
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def partial_path(final: Path) -> Path:
    """A temporary sibling of `final` for this process; `remove_partials` clears dead ones."""
    return final.with_name(f".partial-{final.name}-{os.getpid()}-{time.time_ns()}")


def remove_partials(final: Path) -> None:
    """Leftovers of builders of `final` that died; call with the entry's lock held."""
    for stale in final.parent.glob(f".partial-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def publish(partial: Path, final: Path) -> None:
    """Rename `partial` to `final`. Should `final` have appeared meanwhile (a builder on another
    machine sharing the directory, where flock may not reach), keep it and drop ours."""
    try:
        os.rename(partial, final)
    except OSError as e:
        if not final.exists():
            raise DataError(f"data.cache_dir: cannot publish {final}: {e.strerror or e}") from None
        shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)


def record_build(root: Path, entry: dict) -> None:
    """Append one line describing a build to `root/builds.log` (one write: lines stay whole)."""
    line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "by": holder(), **entry}) + "\n"
    with open(root / BUILDS_LOG, "a") as f:
        f.write(line)
