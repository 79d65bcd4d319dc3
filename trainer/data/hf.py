"""The Hugging Face side of the corpus: `.jsonl`/`.parquet` rows and hub datasets read through
`datasets`, and the hub check that makes a machine without network fail in one line at once
instead of retrying for half a minute.

`datasets` and `tokenizers` are optional packages (`bash launch/setup.sh --hf`); they are
imported only when a config asks for them.
"""

from __future__ import annotations

import glob as globlib
import importlib
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

from .corpus import DataError, Document, Source, file_digest, fingerprint_of, limited

SETUP_HINT = "run `bash launch/setup.sh --hf` (or pip install -e '.[hf]')"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 3.0

_offline: Optional[bool] = None


def optional_import(module: str, key: str, what: str) -> Any:
    """`import module`, or a DataError naming `key` and the setup command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{key}: {what} needs the Hugging Face `{module}` package, which is not installed; "
                        f"{SETUP_HINT}") from None


def first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def quiet_hub() -> None:
    """No warnings from the hub client on stderr: our errors are one line."""
    importlib.import_module("huggingface_hub.utils").logging.set_verbosity_error()


def _quiet(datasets: Any) -> Any:
    datasets.utils.logging.set_verbosity_error()
    quiet_hub()
    return datasets


def _hub_reachable() -> bool:
    """Can this machine open a TCP connection to the hub (or to its HTTPS proxy)? Bounded by
    PROBE_TIMEOUT_S, name resolution included."""
    target = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or \
        os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(target if "://" in target else f"http://{target}")
    if not url.hostname:
        return False
    reached: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=PROBE_TIMEOUT_S).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1)
    return bool(reached)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or the like) is set or the hub cannot be reached. Then this
    process puts the hub libraries in offline mode: they read their local caches only and fail
    at once, instead of retrying with back-off."""
    global _offline
    if _offline is None:
        _offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARIABLES) \
            or not _hub_reachable()
        if _offline:
            os.environ["HF_HUB_OFFLINE"] = "1"  # read when the libraries are imported ...
            hub = sys.modules.get("huggingface_hub.constants")
            if hub is not None:  # ... and where they already are
                hub.HF_HUB_OFFLINE = True
            config = sys.modules.get("datasets.config")
            if config is not None:
                config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    return _offline


def _texts(ds: Any, field: str, what: str) -> Iterator[tuple[int, str]]:
    """(row, text) of every row with non-empty text in column `field`."""
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise DataError(f"data.text_field: {field!r} is not a column of {what} (columns: {', '.join(columns)})")
    row = 0
    for batch in ds.iter(batch_size=1000):
        if field not in batch:
            raise DataError(f"data.text_field: {field!r} is not a column of {what} (columns: {', '.join(batch)})")
        for text in batch[field]:
            if text is not None and not isinstance(text, str):
                raise DataError(f"data.text_field: column {field!r} of {what} holds {type(text).__name__} values, "
                                "not text")
            if text:
                yield row, text
            row += 1


def table_texts(path: Path, builder: str, field: str) -> Iterator[tuple[int, str]]:
    """(row, text) of one local `.jsonl`/`.json`/`.parquet` file, streamed by `datasets` (no copy
    of it is written to the datasets cache)."""
    datasets = _quiet(optional_import("datasets", "data.path", f"{path.name} (a {builder} file)"))
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        yield from _texts(ds, field, str(path))
    except DataError:
        raise
    except Exception as e:  # pyarrow and datasets raise many types; all mean "unreadable"
        raise DataError(f"data.path: {path} cannot be read as {builder}: {first_line(e)}") from None


# ----------------------------------------------------------------------------- hub datasets


def dataset_script_problem(hf_name: str) -> Optional[str]:
    """Why `hf_name` would run a dataset script (arbitrary code), or None.

    `datasets` >= 4 no longer runs scripts, and we never pass `trust_remote_code`; this check also
    covers an older `datasets` installed by hand."""
    path = Path(hf_name).expanduser()
    if path.suffix == ".py":
        return f"{hf_name} is a Python dataset script"
    if path.is_dir() and (path / f"{path.name}.py").is_file():
        return f"{hf_name} holds the dataset script {path.name}.py"
    return None


def _local_digests(hf_name: str, data_files: Optional[str]) -> list[tuple[str, bytes]]:
    """Content digests of the local files a hub-style load reads (a local dataset directory, or
    local data_files), so that editing them changes the fingerprint."""
    files: list[Path] = []
    local = Path(hf_name).expanduser()
    if local.is_dir():
        files += sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
    if data_files:
        files += sorted(Path(p) for p in globlib.glob(os.path.expanduser(data_files), recursive=True)
                        if Path(p).is_file())
    return [(str(p), file_digest(p, "data.hf_data_files")) for p in files]


def hub_source(name: str, config: Optional[str], data_files: Optional[str], split: str, field: str,
               streaming: bool, max_documents: int) -> Source:
    """A dataset loaded by `datasets.load_dataset`: a hub name, a local dataset directory, or a
    builder (`json`, `parquet`, `text`, ...) with data_files. Hub data is fingerprinted by its
    coordinates: a dataset that changes upstream under the same name keeps its cached tokens."""
    problem = dataset_script_problem(name)
    if problem:
        raise DataError(f"data.hf_name: {problem}; dataset scripts run arbitrary code and are refused "
                        "(use data.hf_name=text|json|parquet|csv with data.hf_data_files)")
    fingerprint = fingerprint_of(iter(_local_digests(name, data_files)), f"hf={name}", f"config={config}",
                                 f"data_files={data_files}", f"split={split}", f"text_field={field}",
                                 f"max_documents={max_documents}")
    what = f"{name!r}" + (f" ({config})" if config else "")

    def documents() -> Iterator[Document]:
        datasets = _quiet(optional_import("datasets", "data.dataset", "hf"))
        offline = hub_offline()
        try:
            ds = datasets.load_dataset(name, config, data_files=data_files, split=split, streaming=streaming)
        except Exception as e:  # the library raises many types; all mean "could not load"
            where = (": the Hugging Face hub is unreachable from here (or HF_HUB_OFFLINE is set) and the dataset "
                     "is not in the local datasets cache" if offline else "")
            raise DataError(f"data.hf_name: could not load {what} ({first_line(e)}){where}") from None
        try:
            for row, text in _texts(ds, field, what):
                yield f"{split}/{row}", text
        except DataError:
            raise
        except Exception as e:  # a stream that breaks off, a damaged file in the cache
            raise DataError(f"data.hf_name: reading {what} failed: {first_line(e)}") from None

    description = f"hf {name}/{config or '-'}:{split}" + (" (streamed)" if streaming else "")
    return Source(description, fingerprint, limited(documents, max_documents))
