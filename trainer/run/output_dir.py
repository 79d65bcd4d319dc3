"""A directory that a subcommand writes its results into (`export OUT_DIR`, `compare --out`,
`report --out`), made sure of before any work is done: one line naming the argument if it is
a file, lies under a file, or cannot be created or written."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class OutputDirError(ValueError):
    """An output directory cannot be used; the message names the argument and the path."""


def make_output_dir(path: str | Path, argument: str) -> Path:
    """`path` as an existing, writable directory (created with its parents if need be)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{argument}: {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"{argument}: {path} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"{argument}: {path} is not writable")
    return path


@contextmanager
def writing_into(path: Path, argument: str) -> Iterator[None]:
    """Writes into `path`: an OSError (a full disk, say) becomes one OutputDirError line."""
    try:
        yield
    except OSError as e:
        raise OutputDirError(f"{argument}: writing into {path} failed: {e.strerror or e}") from None
