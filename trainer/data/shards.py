"""Token shards: each split of a tokenised corpus as one memory-mapped file of token ids.

An entry `data.cache_dir/tokens/KEY/` holds `train.bin`, `val.bin` (raw ids, uint8 for
bytes, uint16 when the vocabulary fits, else uint32) and `meta.json`. KEY hashes the corpus
fingerprint, the tokenizer's fingerprint and the split, so another corpus or tokenizer never
reads these tokens. The entry is built once, streaming documents to the files (no process
holds the corpus in memory), by whichever process takes the lock first, and published with
one rename (`cache.py`); every later start only maps the files, and the OS shares their pages
between the ranks of a machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .cache import exclusive, make_dir, partial_path, publish, record_build, remove_partials
from .corpus import DataError, Source, is_val_document
from .tokenizer import Tokenizer, token_dtype

FORMAT = 1  # bump when tokenising or splitting changes: older entries are then not reused
SPLITS = ("train", "val")
BATCH_CHARS = 4 << 20  # documents are tokenised in batches of about this much text


@dataclass
class Shards:
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray
    meta: dict  # what meta.json records: counts, dtype, fingerprints, how long the build took
    path: Path
    status: str  # "built in 3.1s" / "reused" ...: for the start-up log line


def shard_key(source: Source, tokenizer: Tokenizer, val_fraction: float) -> str:
    return hashlib.sha256(json.dumps([FORMAT, source.fingerprint, tokenizer.fingerprint,
                                      val_fraction]).encode()).hexdigest()[:20]


def _map(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        meta = json.loads((path / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        splits = []
        for split in SPLITS:
            n, file = meta[f"{split}_tokens"], path / f"{split}.bin"
            if file.stat().st_size != n * dtype.itemsize:
                raise ValueError(f"{file.name} has {file.stat().st_size} bytes, meta.json says {n} {dtype} tokens")
            splits.append(np.memmap(file, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"data.cache_dir: the token shards in {path} are damaged ({e}); delete that directory and "
                        "start again") from None
    return splits[0], splits[1], meta


class _Writer:
    """Appends documents to one split's file, separators between them."""

    def __init__(self, f: BinaryIO, dtype: np.dtype, separator: np.ndarray):
        self.f, self.dtype, self.separator = f, dtype, separator.astype(dtype)
        self.tokens = self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        if self.documents:
            self.separator.tofile(self.f)
            self.tokens += len(self.separator)
        ids.astype(self.dtype, copy=False).tofile(self.f)
        self.tokens += len(ids)
        self.documents += 1


def _hold_out_tail(partial: Path, writers: dict[str, _Writer], dtype: np.dtype, val_fraction: float) -> None:
    """All documents fell in one split (see corpus.split_documents): its file holds the whole
    stream; its head becomes train and its tail val, copied in chunks from a map of it."""
    stream_file = partial / "stream.bin"
    (partial / f"{'train' if writers['train'].documents else 'val'}.bin").rename(stream_file)
    n = stream_file.stat().st_size // dtype.itemsize
    stream = np.memmap(stream_file, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    cut = int(n * (1 - val_fraction))
    for split, (start, stop) in (("train", (0, cut)), ("val", (cut, n))):
        with open(partial / f"{split}.bin", "wb") as f:
            for chunk in range(start, stop, 1 << 24):
                stream[chunk:min(stop, chunk + (1 << 24))].tofile(f)
        writers[split].tokens = stop - start
    del stream
    stream_file.unlink()


def _build(source: Source, tokenizer: Tokenizer, val_fraction: float, partial: Path) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    partial.mkdir()
    with open(partial / "train.bin", "wb") as ftrain, open(partial / "val.bin", "wb") as fval:
        writers = {split: _Writer(f, dtype, tokenizer.separator) for split, f in (("train", ftrain), ("val", fval))}
        batch_names: list[str] = []
        batch_texts: list = []
        size = 0

        def flush() -> None:
            for name, ids in zip(batch_names, tokenizer.encode_batch(batch_texts)):
                writers["val" if is_val_document(name, val_fraction) else "train"].add(ids)
            batch_names.clear()
            batch_texts.clear()

        for name, text in source.documents():
            batch_names.append(name)
            batch_texts.append(text)
            size += len(text)
            if size >= BATCH_CHARS:
                flush()
                size = 0
        flush()
    documents = {split: w.documents for split, w in writers.items()}
    if not any(documents.values()):
        raise DataError(f"data.dataset: {source.description} holds no documents")
    split = "by document name"
    if not all(documents.values()):
        _hold_out_tail(partial, writers, dtype, val_fraction)
        split = "tail of the stream held out"
    return {"format": FORMAT, "dtype": dtype.name, "train_tokens": writers["train"].tokens,
            "val_tokens": writers["val"].tokens, "train_documents": documents["train"],
            "val_documents": documents["val"], "split": split, "val_fraction": val_fraction,
            "corpus_fingerprint": source.fingerprint, "corpus": source.description,
            "tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer": tokenizer.description}


def _sync(directory: Path) -> None:
    """Every file on disk before the rename publishes them: a crash never leaves a short entry."""
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_shards(source: Source, tokenizer: Tokenizer, val_fraction: float, root: Path, wait_s: float) -> Shards:
    """Map this corpus's token shards, building them first if no process has."""
    final = make_dir(root / "tokens") / shard_key(source, tokenizer, val_fraction)
    if final.is_dir():
        train, val, meta = _map(final)
        return Shards(train, val, meta, final,
                      f"reused from the cache (the build that made them took {meta['build_seconds']:.1f}s)")
    with exclusive(final.with_name(final.name + ".lock"), wait_s, "token shards") as waited:
        if not final.is_dir():
            remove_partials(final)
            started = time.perf_counter()
            partial = partial_path(final)
            try:
                meta = _build(source, tokenizer, val_fraction, partial)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            meta["build_seconds"] = round(time.perf_counter() - started, 3)
            (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            _sync(partial)
            publish(partial, final)
            record_build(root, {"built": "tokens", "path": str(final), "seconds": meta["build_seconds"]})
            train, val, meta = _map(final)
            return Shards(train, val, meta, final, f"built in {meta['build_seconds']:.1f}s")
    train, val, meta = _map(final)
    return Shards(train, val, meta, final, f"built in {meta['build_seconds']:.1f}s by another process "
                                           f"while this one waited {waited:.1f}s")
