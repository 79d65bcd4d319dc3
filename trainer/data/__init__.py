"""Data: corpus -> tokenizer -> memory-mapped token shards -> this rank's share of each batch.

| module | job |
| --- | --- |
| `corpus.py` | what a source of documents is, fingerprints, the split, the stdlib's own `.py` files |
| `files.py` | local files as a source: `.txt` and other plain files, `.jsonl`/`.parquet` rows |
| `hf.py` | what goes through `datasets` (table files, hub datasets) and the offline check of the hub |
| `tokenizer.py` | bytes, a BPE trained on the training split, or a pretrained tokenizer; `tokenizer.json` |
| `cache.py` | `data.cache_dir`: build once under a lock, publish by rename |
| `shards.py` | each split tokenised once into a memory-mapped file, reused by later starts |
| `batches.py` | `TokenBatches`: global batch s depends on (seed, s) only; rank r reads its r-th slice |

`load_corpus` runs on every rank before any process group exists. Each computes the corpus
fingerprint itself (from file contents, or a hub dataset's coordinates) and resolves the
tokenizer; the first process to take the cache lock tokenises, the others wait and map the
published files. The combined fingerprint is what ranks compare at start-up and checkpoints
record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import DataConfig
from .batches import TokenBatches
from .cache import cache_root
from .corpus import DOC_SEPARATOR, DataError, Source, is_val_document, split_documents, stdlib_source, stdlib_sources
from .files import files_source
from .hf import dataset_script_problem, hub_source
from .shards import open_shards
from .tokenizer import BYTES, TOKENIZER_FILE, Tokenizer, resolve_tokenizer, save_tokenizer, saved_tokenizer, token_dtype

__all__ = ["BYTES", "Corpus", "DOC_SEPARATOR", "DataError", "TOKENIZER_FILE", "TokenBatches", "Tokenizer",
           "check_corpus", "dataset_script_problem", "is_val_document", "load_corpus", "open_source",
           "save_tokenizer", "saved_tokenizer", "split_documents", "stdlib_sources", "token_dtype"]


@dataclass
class Corpus:
    train: np.ndarray  # token ids of the training split (memory-mapped)
    val: np.ndarray
    description: str  # one line for logs: source, size, tokenizer, fingerprints
    fingerprint: str  # corpus and tokenizer together: what ranks compare and checkpoints record
    corpus_fingerprint: str
    tokenizer: Tokenizer
    cache: str  # one line for logs: the tokenizer and the shards, built or reused, and where
    shard_dir: Path  # the cache entry holding train.bin, val.bin and meta.json


def open_source(cfg: DataConfig) -> Source:
    if cfg.dataset == "stdlib":
        return stdlib_source(cfg.max_documents)
    if cfg.dataset == "files":
        if not cfg.path:
            raise DataError("data.path: data.dataset=files needs data.path (a file, a directory or a glob pattern)")
        return files_source(cfg.path, cfg.glob, cfg.text_field, cfg.max_documents)
    return hub_source(cfg.hf_name, cfg.hf_config, cfg.hf_data_files, cfg.hf_split, cfg.text_field, cfg.streaming,
                      cfg.max_documents)


def load_corpus(cfg: DataConfig, run_dir: Optional[Path] = None, wait_s: float = 600.0,
                tokenizer: Optional[Tokenizer] = None) -> Corpus:
    """The corpus `cfg` names, tokenised by `tokenizer` (default: the run's, see
    `tokenizer.resolve_tokenizer`; `run_dir` holds a resumed run's `tokenizer.json`). Waiting
    for another process that builds the same cache entry is bounded by `wait_s`."""
    source = open_source(cfg)
    root = cache_root(cfg.cache_dir)
    if tokenizer is None:
        tokenizer, how = resolve_tokenizer(cfg.tokenizer, cfg.bpe_vocab_size, cfg.tokenizer_name, cfg.val_fraction,
                                           source, run_dir, root, wait_s)
    else:
        how = f"tokenizer {tokenizer.description}"
    shards = open_shards(source, tokenizer, cfg.val_fraction, root, wait_s)
    if tokenizer.kind == "bytes":  # the identity tokenizer: keep the corpus's own fingerprint (older checkpoints)
        fingerprint = source.fingerprint
    else:
        fingerprint = hashlib.sha256(f"{source.fingerprint}/{tokenizer.fingerprint}".encode()).hexdigest()[:16]
    m = shards.meta
    documents = m["train_documents"] + m["val_documents"]
    description = (f"{source.description}: {documents} document{'s' if documents != 1 else ''}, "
                   f"{len(shards.train) / 1e6:.2f}M train + {len(shards.val) / 1e6:.2f}M val tokens "
                   f"({tokenizer.description}), fingerprint {fingerprint} (corpus {source.fingerprint}, "
                   f"tokenizer {tokenizer.fingerprint})")
    cache = f"shards {shards.status}, {m['dtype']}, in {shards.path}; {how}"
    return Corpus(shards.train, shards.val, description, fingerprint, source.fingerprint, tokenizer, cache, shards.path)


def check_corpus(corpus: Corpus, vocab_size: int, seq_len: int) -> None:
    """Every token id must index the embedding, and each split must hold one window."""
    needed = corpus.tokenizer.vocab_size
    if vocab_size < needed:
        raise DataError(f"model.vocab_size: the tokenizer ({corpus.tokenizer.description}) needs "
                        f"model.vocab_size >= {needed}, got {vocab_size}")
    for name, tokens in (("train", corpus.train), ("val", corpus.val)):
        if len(tokens) < seq_len + 1:
            raise DataError(f"model.seq_len: the {name} split has {len(tokens)} tokens, fewer than "
                            f"model.seq_len+1={seq_len + 1} (a smaller model.seq_len, more data, or another "
                            "data.val_fraction)")
