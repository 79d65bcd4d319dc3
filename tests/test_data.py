"""Data: the global batch does not depend on the world size; splits are deterministic; bad paths are named;
the token shards hold exactly the split the reference definition gives."""

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import DataError, TokenBatches, load_corpus, split_documents, stdlib_sources

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def test_global_batch_is_the_same_whatever_the_world_size():
    tokens = torch.arange(10_000, dtype=torch.int64) % 251
    whole = TokenBatches(tokens, 16, 8, 0, 1, seed=3, shuffle=True, split_name="train")
    for world in (2, 4, 8):
        parts = [TokenBatches(tokens, 16, 8, r, world, seed=3, shuffle=True, split_name="train") for r in range(world)]
        for step in (0, 1, 77):  # 77 wraps into a later epoch
            x, y = whole.batch(step)
            xs, ys = zip(*(p.batch(step) for p in parts))
            assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    x, y = whole.batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_each_epoch_visits_every_window_once():
    tokens = torch.arange(16 * 10 + 1)
    batches = TokenBatches(tokens, 16, 5, 0, 1, seed=0, shuffle=True, split_name="train")
    starts = sorted(int(x[0]) for step in (0, 1) for x in batches.batch(step)[0])
    assert starts == list(range(0, 160, 16))


def test_stdlib_corpus_excludes_tests_and_is_deterministic():
    root, files = stdlib_sources()
    assert files and all("test" not in p.relative_to(root).parts[:-1] for p in files)
    assert all("site-packages" not in p.parts for p in files)
    a, b = load_corpus(DataConfig()), load_corpus(DataConfig())
    assert a.fingerprint == b.fingerprint and len(a.train) > 1_000_000 and len(a.val) > 10_000


def test_single_document_is_split_at_the_tail():
    train, val = split_documents([("only.txt", b"x" * 900 + b"y" * 100)], 0.1)
    assert train == b"x" * 900 and val == b"y" * 100


def test_files_dataset_and_its_errors(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 20)
    corpus = load_corpus(DataConfig(dataset="files", path=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    assert len(corpus.train) > 0 and len(corpus.val) > 0
    with pytest.raises(DataError, match="^data.path"):
        load_corpus(DataConfig(dataset="files", path=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="^data.glob"):
        load_corpus(DataConfig(dataset="files", path=str(tmp_path), glob="*.md"))
    with pytest.raises(DataError, match="^data.path: no file matches"):
        load_corpus(DataConfig(dataset="files", path=str(tmp_path / "*.md")))
    with pytest.raises(DataError, match="^data.val_fraction"):
        TokenBatches(torch.zeros(10, dtype=torch.uint8), 64, 2, 0, 1, 0, False, "val")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data is not present")
def test_tiny_shakespeare_loads_as_a_files_corpus():
    corpus = load_corpus(DataConfig(dataset="files", path=str(SHAKESPEARE)))
    assert len(corpus.train) + len(corpus.val) == SHAKESPEARE.stat().st_size


def corpus_files(directory: Path, count: int) -> list[tuple[str, bytes]]:
    """`count` text files of varied sizes (some non-ASCII) in `directory`, as (name, bytes) in sorted order."""
    docs = []
    for i in range(count):
        text = f"document {i}: caf\u00e9 \u2014 " + "word " * (7 * i + 3) + "\n"
        (directory / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        docs.append((f"doc{i:02d}.txt", text.encode("utf-8")))
    return docs


@pytest.mark.parametrize("count", [1, 40])  # one document: the stream's tail is held out
def test_byte_shards_hold_exactly_the_reference_split(tmp_path, count):
    (tmp_path / "docs").mkdir()
    docs = corpus_files(tmp_path / "docs", count)
    path = tmp_path / "docs" / "doc00.txt" if count == 1 else tmp_path / "docs"
    corpus = load_corpus(DataConfig(dataset="files", path=str(path), cache_dir=str(tmp_path / "cache")))
    train, val = split_documents(docs, 0.05)
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint8
    assert corpus.train.tobytes() == train and corpus.val.tobytes() == val
    assert len(val) > 0


def test_windows_of_a_mapped_shard_are_those_of_the_same_tokens_in_memory(tmp_path):
    ids = (np.arange(5_000) * 7919 % 4099).astype(np.uint16)  # ids above 255: a uint16 shard
    ids.tofile(tmp_path / "tokens.bin")
    mapped = np.memmap(tmp_path / "tokens.bin", dtype=np.uint16, mode="r")
    for rank in (0, 1):
        a = TokenBatches(mapped, 16, 8, rank, 2, seed=5, shuffle=True, split_name="train")
        b = TokenBatches(torch.from_numpy(ids.astype(np.int64)), 16, 8, rank, 2, seed=5, shuffle=True,
                         split_name="train")
        for step in (0, 3, 40):
            (xa, ya), (xb, yb) = a.batch(step), b.batch(step)
            assert xa.dtype == torch.int64 and torch.equal(xa, xb) and torch.equal(ya, yb)
