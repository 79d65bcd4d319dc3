"""Tokenizers (`data.tokenizer`): text to the ids the model reads, each with a fingerprint.

- `bytes`: one token per UTF-8 byte (ids 0-255); documents are separated by two newlines.
- `bpe`: a byte-level BPE trained with the `tokenizers` library on the corpus's training split
  (`data.bpe_vocab_size` ids, `<|endoftext|>` = id 0 separates documents). Training is
  deterministic; the result is cached under `data.cache_dir` (keyed by the corpus
  fingerprint and the settings) and saved as `run.dir/tokenizer.json`, which a resumed run,
  `eval` and `sample` read.
- `pretrained`: `data.tokenizer_name`, a local `tokenizer.json` (or a directory holding one)
  or a hub repository's `tokenizer.json`; also saved as `run.dir/tokenizer.json`.

The fingerprint hashes the tokenizer's whole JSON, so ranks whose tokenizers differ in any
way disagree at start-up, and token shards are keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .cache import exclusive, make_dir, partial_path, publish, record_build, remove_partials
from .corpus import DOC_SEPARATOR, DataError, Source, Text, is_val_document
from .hf import first_line, hub_offline, optional_import, quiet_hub

TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
SEPARATOR_TOKENS = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>")  # a pretrained tokenizer's first one present
BPE_FORMAT = 1  # bump when training changes: cached tokenizers of older formats are not reused


def _as_str(text: Text) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


class ByteTokenizer:
    kind = "bytes"
    vocab_size = 256
    fingerprint = "bytes"
    description = "bytes, 256 ids"
    separator = np.frombuffer(DOC_SEPARATOR, dtype=np.uint8)

    def encode_batch(self, texts: Sequence[Text]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8") if isinstance(t, str) else t, dtype=np.uint8) for t in texts]

    def encode(self, text: Text) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(min(int(t), 255) for t in ids).decode("utf-8", errors="replace")

    def to_json(self) -> Optional[str]:
        return None  # nothing to save: bytes are bytes


class HFTokenizer:
    """A `tokenizers.Tokenizer` (trained BPE or pretrained) behind the same small interface."""

    def __init__(self, tok: Any, kind: str, origin: str):
        self.tok, self.kind = tok, kind
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
        self.description = f"{origin}, {self.vocab_size} ids"
        special = next((vocab[t] for t in SEPARATOR_TOKENS if t in vocab), None)
        sep = [special] if special is not None else tok.encode("\n\n", add_special_tokens=False).ids
        self.separator = np.array(sep, dtype=np.int64)
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster where it exists

    def encode_batch(self, texts: Sequence[Text]) -> list[np.ndarray]:
        encodings = self._encode([_as_str(t) for t in texts], add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encodings]

    def encode(self, text: Text) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def to_json(self) -> Optional[str]:
        return self.tok.to_str()


Tokenizer = Union[ByteTokenizer, HFTokenizer]
BYTES = ByteTokenizer()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: uint8 (bytes), uint16, else uint32."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def from_file(path: Path, kind: str, key: str = "data.tokenizer_name") -> HFTokenizer:
    tokenizers = optional_import("tokenizers", "data.tokenizer", kind)
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # a Rust error string: the file is not a tokenizer.json
        raise DataError(f"{key}: {path} is not a tokenizer.json the tokenizers library reads ({first_line(e)})") \
            from None
    if not tok.get_vocab(with_added_tokens=True):
        raise DataError(f"{key}: {path} has an empty vocabulary (no token ids): it cannot encode any text")
    return HFTokenizer(tok, kind, f"{kind} {path}")


# ----------------------------------------------------------------------------- BPE


def _new_bpe(tokenizers: Any, vocab_size: int) -> tuple[Any, Any]:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def train_bpe(source: Source, vocab_size: int, val_fraction: float) -> Any:
    """A byte-level BPE trained on the training split of `source` (deterministic: same corpus
    and settings, same tokenizer, in any process)."""
    tokenizers = optional_import("tokenizers", "data.tokenizer", "bpe")
    held_out = [0, 0]  # documents in (train, val)

    def train_texts() -> Iterator[str]:
        for name, text in source.documents():
            val = is_val_document(name, val_fraction)
            held_out[val] += 1
            if not val:
                yield _as_str(text)

    def head_of_stream() -> Iterator[str]:  # the split that holds out the stream's tail (see corpus.py)
        total = sum(len(_as_str(text)) + 2 for _, text in source.documents())
        left = int(total * (1 - val_fraction))
        for _, text in source.documents():
            text = _as_str(text)[:left]
            left -= len(text) + 2
            if text:
                yield text
            if left <= 0:
                return

    tok, trainer = _new_bpe(tokenizers, vocab_size)
    tok.train_from_iterator(train_texts(), trainer)
    if not held_out[0] or not held_out[1]:
        if not any(held_out):
            raise DataError(f"data.dataset: {source.description} holds no documents")
        tok, trainer = _new_bpe(tokenizers, vocab_size)
        tok.train_from_iterator(head_of_stream(), trainer)
    return tok


def cached_bpe(source: Source, vocab_size: int, val_fraction: float, root: Path, wait_s: float
               ) -> tuple[HFTokenizer, str]:
    """The BPE of this corpus and these settings: from the cache, or trained once (by whichever
    process takes the lock first) and published there. Returns it and a few words on which."""
    key = hashlib.sha256(json.dumps([BPE_FORMAT, source.fingerprint, vocab_size, val_fraction]).encode()).hexdigest()
    final = make_dir(root / "tokenizers") / f"bpe-{key[:20]}.json"
    if not final.is_file():
        with exclusive(final.with_suffix(".lock"), wait_s, "a BPE tokenizer") as waited:
            if not final.is_file():
                remove_partials(final)
                started = time.perf_counter()
                tok = train_bpe(source, vocab_size, val_fraction)
                seconds = time.perf_counter() - started
                partial = partial_path(final)
                partial.write_text(tok.to_str())
                publish(partial, final)
                record_build(root, {"built": "tokenizer", "path": str(final), "seconds": round(seconds, 3)})
                return HFTokenizer(tok, "bpe", "bpe"), f"bpe tokenizer trained in {seconds:.1f}s"
            if waited > 0.5:
                return from_file(final, "bpe"), f"bpe tokenizer trained by another process (waited {waited:.1f}s)"
    tokenizer = from_file(final, "bpe")
    tokenizer.description = f"bpe, {tokenizer.vocab_size} ids"
    return tokenizer, f"bpe tokenizer reused from {final}"


# ----------------------------------------------------------------------------- pretrained, and the run's own


def pretrained(name: str) -> HFTokenizer:
    """`name`: a tokenizer.json, a directory holding one, or a hub repository (its tokenizer.json,
    from the local hub cache when the hub cannot be reached)."""
    local = Path(name).expanduser()
    if local.is_dir():
        local = local / TOKENIZER_FILE
    if local.is_file():
        return from_file(local, "pretrained")
    if name.startswith(("/", ".", "~")):
        raise DataError(f"data.tokenizer_name: {local} does not exist")
    optional_import("tokenizers", "data.tokenizer", "pretrained")
    hub = optional_import("huggingface_hub", "data.tokenizer", "pretrained")
    quiet_hub()
    offline = hub_offline()
    try:
        path = hub.hf_hub_download(name, TOKENIZER_FILE)
    except Exception as e:  # not found, no network, gated: the hub client raises many types
        where = (": the Hugging Face hub is unreachable from here (or HF_HUB_OFFLINE is set) and it is not in the "
                 "local hub cache" if offline else "")
        raise DataError(f"data.tokenizer_name: could not get {name}'s {TOKENIZER_FILE} ({first_line(e)}){where}") \
            from None
    tokenizer = from_file(Path(path), "pretrained")
    tokenizer.description = f"pretrained {name}, {tokenizer.vocab_size} ids"
    return tokenizer


def resolve_tokenizer(kind: str, bpe_vocab_size: int, tokenizer_name: Optional[str], val_fraction: float,
                      source: Source, run_dir: Optional[Path], root: Path, wait_s: float) -> tuple[Tokenizer, str]:
    """The tokenizer of a run, and a few words on where it came from: `run.dir/tokenizer.json`
    when the run has one (a resumed run), else bytes, the cached or newly trained BPE, or the
    pretrained one."""
    if kind == "bytes":
        return BYTES, "bytes"
    saved = run_dir / TOKENIZER_FILE if run_dir is not None else None
    if saved is not None and saved.is_file():
        return from_file(saved, kind, "run.dir"), f"{kind} tokenizer from {saved}"
    if kind == "pretrained":
        tokenizer = pretrained(tokenizer_name)
        return tokenizer, f"tokenizer {tokenizer.description}"
    return cached_bpe(source, bpe_vocab_size, val_fraction, root, wait_s)


def save_tokenizer(tokenizer: Tokenizer, directory: Path, replace: bool = False) -> Optional[Path]:
    """Write `directory/tokenizer.json` (atomically) unless the tokenizer is bytes, or the file
    is there already and not to be replaced (a resumed run keeps its own)."""
    text = tokenizer.to_json()
    path = directory / TOKENIZER_FILE
    if text is None or (path.is_file() and not replace):
        return None
    partial = path.with_name(f".{TOKENIZER_FILE}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)
    return path


def saved_tokenizer(kind: str, tokenizer_name: Optional[str], path: Path) -> Tokenizer:
    """The tokenizer a trained model reads (`eval`, `sample`): bytes, or the `tokenizer.json`
    saved with the run, in `path` (an export or a run.dir) or in the run.dir of the checkpoint
    directory `path`. A pretrained one missing there is loaded by name."""
    if kind == "bytes":
        return BYTES
    places = [path] + ([path.parent.parent] if path.parent.name == "checkpoints" else [])
    for place in places:
        if (place / TOKENIZER_FILE).is_file():
            return from_file(place / TOKENIZER_FILE, kind, TOKENIZER_FILE)
    if kind == "pretrained" and tokenizer_name:
        return pretrained(tokenizer_name)
    raise DataError(f"{path}: the run used data.tokenizer={kind}, but no {TOKENIZER_FILE} is in "
                    f"{' or '.join(str(p) for p in places)}")
