"""Corpora, byte-level tokens, and the per-rank share of each global batch.

The default corpus is the Python standard library's own `.py` sources on this machine:
real, human-written text present everywhere (tests and site-packages excluded, files in
sorted order, a fingerprint logged so two runs can tell whether they saw the same bytes).

Tokens are bytes (vocabulary 256). Documents are packed into one stream; training
sequences are consecutive windows of it, visited in a seeded random order per epoch.
Which windows form step s's global batch depends only on (seed, s), and rank r takes
the r-th slice of it: every world size trains on the same data, and resuming at step s
needs no loader state but s.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig
from .seeding import derived_seed

DOC_SEPARATOR = b"\n\n"
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """The corpus cannot be loaded or is too small; the message names the config key."""


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 tokens
    val: torch.Tensor
    description: str  # one line for logs: source, size, fingerprint
    fingerprint: str


def stdlib_sources() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if STDLIB_EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append(path)
    return root, files


def is_val_document(name: str, val_fraction: float) -> bool:
    """A fixed, layout-independent split: the document's name decides."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 10_000
    return bucket < val_fraction * 10_000


def split_documents(docs: list[tuple[str, bytes]], val_fraction: float) -> tuple[bytes, bytes]:
    train = [text for name, text in docs if not is_val_document(name, val_fraction)]
    val = [text for name, text in docs if is_val_document(name, val_fraction)]
    if not train or not val:  # one document, or too few to split by name: hold out the tail
        stream = DOC_SEPARATOR.join(text for _, text in docs)
        cut = int(len(stream) * (1 - val_fraction))
        return stream[:cut], stream[cut:]
    return DOC_SEPARATOR.join(train), DOC_SEPARATOR.join(val)


def _tokens(stream: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(stream), dtype=torch.uint8) if stream else torch.zeros(0, dtype=torch.uint8)


def _fingerprint(docs: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode() + b"\0" + hashlib.sha256(text).digest())
    return h.hexdigest()[:16]


def _stdlib_documents() -> tuple[list[tuple[str, bytes]], str]:
    root, files = stdlib_sources()
    return [(str(p.relative_to(root)), p.read_bytes()) for p in files], f"stdlib {root}"


def _file_documents(cfg: DataConfig) -> tuple[list[tuple[str, bytes]], str]:
    root = Path(cfg.path).expanduser()
    if root.is_file():
        return [(root.name, root.read_bytes())], f"file {root}"
    if not root.is_dir():
        raise DataError(f"data.path: {root} is neither a file nor a directory")
    files = sorted(p for p in root.glob(cfg.glob) if p.is_file())
    if not files:
        raise DataError(f"data.glob: no file under {root} matches {cfg.glob!r}")
    return [(str(p.relative_to(root)), p.read_bytes()) for p in files], f"files {root}/{cfg.glob}"


def dataset_script_problem(hf_name: str) -> str | None:
    """Why `hf_name` would run a dataset script (arbitrary code), or None.

    `datasets` >= 4 no longer runs scripts, and we never pass `trust_remote_code`; this check also
    covers an older `datasets` installed by hand."""
    path = Path(hf_name).expanduser()
    if path.suffix == ".py":
        return f"{hf_name} is a Python dataset script"
    if path.is_dir() and (path / f"{path.name}.py").is_file():
        return f"{hf_name} holds the dataset script {path.name}.py"
    return None


def _hf_documents(cfg: DataConfig) -> tuple[list[tuple[str, bytes]], str]:
    problem = dataset_script_problem(cfg.hf_name)
    if problem:
        raise DataError(f"data.hf_name: {problem}; dataset scripts run arbitrary code and are refused "
                        "(use data.hf_name=text|json|parquet|csv with data.hf_data_files)")
    try:
        import datasets
    except ImportError:
        raise DataError("data.dataset=hf needs the Hugging Face `datasets` package: pip install -e '.[hf]'") from None
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, data_files=cfg.hf_data_files, split=cfg.hf_split)
    except Exception as e:  # the library raises many types; all mean "could not load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data.hf_name: could not load {cfg.hf_name!r} ({first}); with no network, only "
                        "datasets already in the local cache or local data_files load "
                        "(set HF_DATASETS_OFFLINE=1 to skip the hub)") from None
    if cfg.hf_text_field not in ds.column_names:
        raise DataError(f"data.hf_text_field: {cfg.hf_text_field!r} is not a column of {cfg.hf_name!r} "
                        f"(columns: {', '.join(ds.column_names)})")
    docs = [(f"{cfg.hf_split}/{i}", text.encode("utf-8")) for i, text in enumerate(ds[cfg.hf_text_field]) if text]
    return docs, f"hf {cfg.hf_name}/{cfg.hf_config or '-'}:{cfg.hf_split}"


def load_corpus(cfg: DataConfig) -> Corpus:
    loaders = {"stdlib": _stdlib_documents, "files": lambda: _file_documents(cfg), "hf": lambda: _hf_documents(cfg)}
    docs, source = loaders[cfg.dataset]()
    if not docs:
        raise DataError(f"data.dataset: {source} holds no documents")
    train, val = split_documents(docs, cfg.val_fraction)
    fingerprint = _fingerprint(docs)
    description = (f"{source}: {len(docs)} documents, {len(train) / 1e6:.2f} MB train, "
                   f"{len(val) / 1e6:.2f} MB val, fingerprint {fingerprint}")
    return Corpus(_tokens(train), _tokens(val), description, fingerprint)


def check_corpus(corpus: Corpus, vocab_size: int, seq_len: int) -> None:
    """Every token id must index the embedding, and each split must hold one window."""
    for name, tokens in (("train", corpus.train), ("val", corpus.val)):
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise DataError(f"model.vocab_size: the {name} split holds token id {int(tokens.max())}, "
                            f"beyond model.vocab_size={vocab_size}")
        if len(tokens) < seq_len + 1:
            raise DataError(f"model.seq_len: the {name} split has {len(tokens)} tokens, fewer than "
                            f"model.seq_len+1={seq_len + 1} (a smaller model.seq_len, more data, or another "
                            "data.val_fraction)")


class TokenBatches:
    """This rank's share of each global batch of (input, target) windows of `seq_len + 1` tokens."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, global_batch: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, split_name: str):
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"data.val_fraction: the {split_name} split has {len(tokens)} tokens, fewer than "
                            f"model.seq_len+1={seq_len + 1}")
        self.global_batch = global_batch
        per_rank = global_batch // world_size
        self.first, self.count = rank * per_rank, per_rank
        self._epoch, self._order = -1, None
        self._base_index = self._base_position = 0  # batch `index` starts at window position ...

    def continue_from(self, index: int, position: int) -> None:
        """Make global batch `index` start at window `position` (a resumed run, whatever batch size it had)."""
        self._base_index, self._base_position = index, position

    def _window_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(derived_seed(self.seed, "data", epoch))
                self._order = torch.randperm(self.num_windows, generator=gen)
            else:
                self._order = torch.arange(self.num_windows)
            self._epoch = epoch
        return self._order

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [per-rank batch, seq_len] (int64) of global batch number `index`."""
        rows = []
        for j in range(self.first, self.first + self.count):
            position = self._base_position + (index - self._base_index) * self.global_batch + j
            epoch, within = divmod(position, self.num_windows)
            start = int(self._window_order(epoch)[within]) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len + 1])
        window_BS1 = torch.stack(rows).long()
        return window_BS1[:, :-1], window_BS1[:, 1:]

    def position_of(self, index: int) -> int:
        """Windows consumed before global batch `index`."""
        return self._base_position + (index - self._base_index) * self.global_batch

    def epoch_of(self, index: int) -> float:
        return self.position_of(index) / self.num_windows
