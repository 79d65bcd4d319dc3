"""Documents: what a source of them is, its fingerprint, the train/validation split, and the
stdlib's own sources (the default corpus). Local files are `files.py`, `datasets` is `hf.py`;
this module reads neither.

A `Source` yields `(name, text)` documents, in the same order on every pass. Its fingerprint
is known before anything is read for tokenising: it hashes the bytes of local files (the
stdlib's sources, `.txt`, `.jsonl`, `.parquet`) or, for a hub dataset, its coordinates
(`hf.py`). Every rank computes it on its own, so ranks can compare it before any collective,
and the token cache is keyed by it.

The split is fixed and layout-independent: a hash of each document's name decides whether
it is held out. When that leaves one split empty (one document, or very few), the tail of
the whole stream is held out instead.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

DOC_SEPARATOR = b"\n\n"
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

Text = Union[str, bytes]  # plain files are read as bytes (the bytes tokenizer takes them as they are)
Document = tuple[str, Text]


class DataError(ValueError):
    """The corpus or tokenizer cannot be loaded, or is too small; the message names the config key."""


@dataclass
class Source:
    description: str  # one line for logs, e.g. "files /data/*.jsonl"
    fingerprint: str  # of the documents this source yields (content for local files, coordinates for the hub)
    documents: Callable[[], Iterator[Document]]  # a fresh pass on every call, in the same order


def is_val_document(name: str, val_fraction: float) -> bool:
    """A fixed, layout-independent split: the document's name decides."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 10_000
    return bucket < val_fraction * 10_000


def split_documents(docs: list[tuple[str, bytes]], val_fraction: float) -> tuple[bytes, bytes]:
    """The split of byte documents, whole streams in memory: the definition the token shards follow."""
    train = [text for name, text in docs if not is_val_document(name, val_fraction)]
    val = [text for name, text in docs if is_val_document(name, val_fraction)]
    if not train or not val:  # one document, or too few to split by name: hold out the tail
        stream = DOC_SEPARATOR.join(text for _, text in docs)
        cut = int(len(stream) * (1 - val_fraction))
        return stream[:cut], stream[cut:]
    return DOC_SEPARATOR.join(train), DOC_SEPARATOR.join(val)


def unreadable(path: Path, key: str, error: OSError) -> DataError:
    return DataError(f"{key}: {path} cannot be read: {error.strerror or error}")


def file_digest(path: Path, key: str = "data.path") -> bytes:
    """sha256 of the file's bytes; a DataError naming `key` and the file if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise unreadable(path, key, e) from None
    return h.digest()


def read_document(path: Path, key: str = "data.path") -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise unreadable(path, key, e) from None


def fingerprint_of(named_digests: Iterator[tuple[str, bytes]], *settings: str) -> str:
    """16 hex digits over (name, content digest) pairs in order, then any settings that change the documents."""
    h = hashlib.sha256()
    for name, digest in named_digests:
        h.update(name.encode() + b"\0" + digest)
    for setting in settings:
        h.update(b"\0" + setting.encode())
    return h.hexdigest()[:16]


def limited(documents: Callable[[], Iterator[Document]], max_documents: int) -> Callable[[], Iterator[Document]]:
    if max_documents <= 0:
        return documents
    return lambda: itertools.islice(documents(), max_documents)


# ----------------------------------------------------------------------------- the stdlib


def stdlib_sources() -> tuple[Path, list[Path]]:
    """This Python's own `.py` sources, tests and installed packages excluded, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):  # prunes the excluded trees instead of listing them
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        files += [Path(folder) / n for n in names if n.endswith(".py") and not n.startswith("test_")]
    return root, sorted(files)


def stdlib_source(max_documents: int) -> Source:
    root, files = stdlib_sources()
    if max_documents > 0:
        files = files[:max_documents]
    names = [str(p.relative_to(root)) for p in files]
    key = "data.dataset=stdlib"
    fingerprint = fingerprint_of(((n, file_digest(p, key)) for n, p in zip(names, files)))
    return Source(f"stdlib {root}", fingerprint, lambda: ((n, read_document(p, key)) for n, p in zip(names, files)))
