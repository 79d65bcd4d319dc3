"""Data: the global batch does not depend on the world size; splits are deterministic; bad paths are named."""

from pathlib import Path

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
    corpus = load_corpus(DataConfig(dataset="files", path=str(tmp_path)))
    assert len(corpus.train) > 0 and len(corpus.val) > 0
    with pytest.raises(DataError, match="^data.path"):
        load_corpus(DataConfig(dataset="files", path=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="^data.glob"):
        load_corpus(DataConfig(dataset="files", path=str(tmp_path), glob="*.md"))
    with pytest.raises(DataError, match="^data.val_fraction"):
        TokenBatches(torch.zeros(10, dtype=torch.uint8), 64, 2, 0, 1, 0, False, "val")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data is not present")
def test_tiny_shakespeare_loads_as_a_files_corpus():
    corpus = load_corpus(DataConfig(dataset="files", path=str(SHAKESPEARE)))
    assert len(corpus.train) + len(corpus.val) == SHAKESPEARE.stat().st_size
