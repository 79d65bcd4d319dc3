"""Local files as a corpus: `data.path` is one file, a directory (files matching `data.glob`) or a
glob pattern. Plain files are one document each; `.jsonl`/`.json`/`.parquet` files hold a
document per row, read through `datasets` (`hf.py`)."""

from __future__ import annotations

import glob as globlib
import itertools
from pathlib import Path
from typing import Iterator

from .corpus import DataError, Document, Source, file_digest, fingerprint_of, limited, read_document
from .hf import table_texts

TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # read by `datasets`, a row per document


def resolve_files(path: str, pattern: str) -> tuple[Path, list[Path], str]:
    """(root the names are relative to, the files in sorted order, a description) of `data.path`:
    one file, a directory (files matching `data.glob`) or a glob pattern."""
    given = Path(path).expanduser()
    if given.is_file():
        return given.parent, [given], f"file {given}"
    if given.is_dir():
        files = sorted(p for p in given.glob(pattern) if p.is_file())
        if not files:
            raise DataError(f"data.glob: no file under {given} matches {pattern!r}")
        return given, files, f"files {given}/{pattern}"
    if globlib.has_magic(str(given)):
        files = sorted(Path(p) for p in globlib.glob(str(given), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.path: no file matches the pattern {path}")
        root = Path(*itertools.takewhile(lambda part: not globlib.has_magic(part), given.parts))
        return root, files, f"files {given}"
    raise DataError(f"data.path: {given} is neither a file, a directory nor a glob pattern that matches files")


def files_source(path: str, pattern: str, text_field: str, max_documents: int) -> Source:
    """`.txt` and other plain files are one document each; `.jsonl`/`.json`/`.parquet` files
    hold a document per row (the `data.text_field` column), read through `datasets`."""
    root, files, description = resolve_files(path, pattern)
    tables = [p for p in files if p.suffix in TABLE_BUILDERS]
    if max_documents > 0 and not tables:
        files = files[:max_documents]  # only these are read: only these count
    names = [str(p.relative_to(root)) for p in files]
    settings = [f"text_field={text_field}"] if tables else []
    if max_documents > 0:
        settings.append(f"max_documents={max_documents}")
    fingerprint = fingerprint_of(((n, file_digest(p)) for n, p in zip(names, files)), *settings)

    def documents() -> Iterator[Document]:
        for name, file in zip(names, files):
            if file.suffix in TABLE_BUILDERS:
                for row, text in table_texts(file, TABLE_BUILDERS[file.suffix], text_field):
                    yield f"{name}#{row}", text
            else:
                yield name, read_document(file)

    return Source(description, fingerprint, limited(documents, max_documents))
