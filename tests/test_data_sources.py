"""Corpora through `datasets`: jsonl and parquet files give the documents written into them (by
`datasets` and `pyarrow` here), globs pick files, bad columns and files are one line naming the
key, and a hub dataset that cannot be reached fails at once in one line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from trainer.config import DataConfig
from trainer.data import DataError, load_corpus, open_source

from .cli import REPO, run_cli

datasets = pytest.importorskip("datasets", reason="needs the hf extra: bash launch/setup.sh --hf")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32", "moe.num_experts=4",
         "moe.d_ff=32", "train.batch_size=4", "train.steps=2", "train.eval_every=0", "train.eval_batches=1",
         "run.progress=false", "parallel.ep=1"]
TEXTS = [f"row {i}: caf\u00e9 " + "token " * (i % 13 + 1) for i in range(60)]


def documents(cfg: DataConfig) -> list[tuple[str, str]]:
    return [(name, text) for name, text in open_source(cfg).documents()]


def test_jsonl_rows_written_by_datasets_are_the_documents(tmp_path):
    rows = {"text": TEXTS[:30] + [""] + TEXTS[30:], "id": list(range(61))}  # an empty row is no document
    datasets.Dataset.from_dict(rows).to_json(tmp_path / "part.jsonl")  # JSON lines
    got = documents(DataConfig(dataset="files", path=str(tmp_path / "part.jsonl")))
    assert [text for _, text in got] == TEXTS
    assert got[30][0] == "part.jsonl#31"  # names keep the row number: the split does not shift
    corpus = load_corpus(DataConfig(dataset="files", path=str(tmp_path / "part.jsonl"), val_fraction=0.2,
                                    cache_dir=str(tmp_path / "cache")))
    assert "61 documents" not in corpus.description and "60 documents" in corpus.description


def test_parquet_files_by_glob_pattern_with_another_text_column(tmp_path):
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"body": TEXTS[:25], "n": list(range(25))}), tmp_path / "shards" / "a.parquet")
    pq.write_table(pa.table({"body": TEXTS[25:]}), tmp_path / "shards" / "b.parquet")
    (tmp_path / "shards" / "notes.md").write_text("not matched")
    cfg = DataConfig(dataset="files", path=str(tmp_path / "shards" / "*.parquet"), text_field="body")
    got = documents(cfg)
    assert [text for _, text in got] == TEXTS
    assert got[0][0] == "a.parquet#0" and got[25][0] == "b.parquet#0"
    assert documents(DataConfig(dataset="files", path=str(tmp_path / "shards"), glob="*.parquet", text_field="body",
                                max_documents=7)) == got[:7]
    with pytest.raises(DataError, match="^data.text_field: 'text' is not a column .*columns: body, n"):
        documents(DataConfig(dataset="files", path=str(tmp_path / "shards" / "a.parquet")))


def test_mixed_directory_and_unreadable_jsonl_are_named(tmp_path):
    (tmp_path / "a.txt").write_text("a whole file is one document\n")
    datasets.Dataset.from_dict({"text": TEXTS[:3]}).to_json(tmp_path / "b.jsonl")
    got = documents(DataConfig(dataset="files", path=str(tmp_path), glob="*"))
    assert got == [("a.txt", b"a whole file is one document\n"), *((f"b.jsonl#{i}", TEXTS[i]) for i in range(3))]
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"^data.path: .*c.jsonl cannot be read as json") as err:
        documents(DataConfig(dataset="files", path=str(tmp_path), glob="*"))
    assert "\n" not in str(err.value)
    (tmp_path / "c.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="^data.text_field: column 'text' .* holds int values"):
        documents(DataConfig(dataset="files", path=str(tmp_path / "c.jsonl")))


def test_the_fingerprint_follows_the_bytes_and_the_text_column(tmp_path):
    datasets.Dataset.from_dict({"text": TEXTS, "title": TEXTS[::-1]}).to_json(tmp_path / "a.jsonl")
    cfg = DataConfig(dataset="files", path=str(tmp_path / "a.jsonl"))
    first = open_source(cfg).fingerprint
    assert open_source(cfg).fingerprint == first
    assert open_source(DataConfig(dataset="files", path=str(tmp_path / "a.jsonl"), text_field="title")).fingerprint \
        != first
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text().replace("row 7:", "row 8:"))
    assert open_source(cfg).fingerprint != first


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_an_unreachable_hub_dataset_is_one_line_at_once(tmp_path):
    started = time.perf_counter()
    result = run_cli(["train", TINY, *SMALL, "data.dataset=hf", "data.hf_name=moe-trainer-tests/no-such-dataset",
                      f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}"], env=OFFLINE, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # no retry warnings, no traceback
    assert result.stderr.startswith("error: data.hf_name: could not load 'moe-trainer-tests/no-such-dataset'")
    assert "unreachable" in result.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s"  # imports only: the hub's retry loop alone takes ~25 s


@pytest.fixture
def fresh_hub_state(monkeypatch):
    """The hub check runs again in this test, and whatever it switches off is restored after it."""
    import trainer.data.hf as hf

    for name in hf.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf, "_offline", None)
    for module, names in (("huggingface_hub.constants", ["HF_HUB_OFFLINE"]),
                          ("datasets.config", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])):
        if module in sys.modules:
            for name in names:
                monkeypatch.setattr(sys.modules[module], name, getattr(sys.modules[module], name))
    return hf


def test_without_offline_variables_the_hub_probe_fails_fast_too(fresh_hub_state):
    """No HF_HUB_OFFLINE: the trainer probes the hub itself. Without network it goes offline and
    fails in seconds; with network the made-up name is refused by the hub, also in one line."""
    hf = fresh_hub_state
    started = time.perf_counter()
    with pytest.raises(DataError, match="^data.hf_name: could not load") as err:
        load_corpus(DataConfig(dataset="hf", hf_name="moe-trainer-tests/no-such-dataset-3f9a"))
    assert "\n" not in str(err.value)
    assert time.perf_counter() - started < 20
    assert hf.hub_offline() == ("unreachable" in str(err.value))
    if hf.hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_pretrained_tokenizer_that_cannot_be_fetched_is_one_line(tmp_path, monkeypatch, fresh_hub_state):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="^data.tokenizer_name: could not get") as err:
        load_corpus(DataConfig(max_documents=3, tokenizer="pretrained",
                               tokenizer_name="moe-trainer-tests/no-such-tokenizer", cache_dir=str(tmp_path)))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="^data.tokenizer_name: .* does not exist"):
        load_corpus(DataConfig(max_documents=3, tokenizer="pretrained", tokenizer_name=str(tmp_path / "nope.json")))


def test_a_local_hf_builder_with_data_files(tmp_path):
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "data.parquet")
    cfg = DataConfig(dataset="hf", hf_name="parquet", hf_data_files=str(tmp_path / "data.parquet"))
    got = documents(cfg)
    assert [text for _, text in got] == TEXTS and got[0][0] == "train/0"
    assert Path(tmp_path / "data.parquet").is_file()


def test_a_missing_optional_package_is_one_line_naming_the_setup_command(tmp_path, monkeypatch):
    """As on a machine without the hf extra: the import fails (a None entry in sys.modules)."""
    datasets.Dataset.from_dict({"text": TEXTS[:3]}).to_json(tmp_path / "a.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"^data.path: a.jsonl \(a json file\) needs the Hugging Face `datasets` "
                                        r"package, which is not installed; run `bash launch/setup.sh --hf`"):
        documents(DataConfig(dataset="files", path=str(tmp_path / "a.jsonl")))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(DataError, match=r"^data.tokenizer: bpe needs the Hugging Face `tokenizers` package, .* "
                                        r"`bash launch/setup.sh --hf`"):
        load_corpus(DataConfig(max_documents=3, tokenizer="bpe", cache_dir=str(tmp_path / "cache")))
