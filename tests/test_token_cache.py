"""Tokenizers and the token-shard cache: a BPE trained on a slice of the stdlib round-trips text,
sees only the training split and is deterministic; it is saved with the run and reused (resume,
eval, export, sample). Shards are built once, then only mapped; their key covers the corpus and
the tokenizer; waiting for a builder is bounded; two ranks build once."""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from trainer.__main__ import main
from trainer.config import ConfigError, DataConfig, load_config
from trainer.config_validation import validate
from trainer.data import DataError, check_corpus, is_val_document, load_corpus, open_source
from trainer.data.cache import BUILDS_LOG
from trainer.data.shards import shard_key
from trainer.data.tokenizer import HFTokenizer, train_bpe
from trainer.run.tracking import read_metrics

from .cli import REPO, run_cli

tokenizers = pytest.importorskip("tokenizers", reason="needs the hf extra: bash launch/setup.sh --hf")

TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32", "moe.num_experts=4",
         "moe.d_ff=32", "train.batch_size=4", "train.steps=2", "train.eval_every=0", "train.eval_batches=1",
         "run.progress=false", "run.log_every=1", "parallel.ep=1"]
SLICE = 20  # the first 20 stdlib files: about 230 KB
BPE = ["data.tokenizer=bpe", "data.bpe_vocab_size=512", "model.vocab_size=512", f"data.max_documents={SLICE}"]


def builds(cache: Path) -> list[dict]:
    log = cache / BUILDS_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


# ----------------------------------------------------------------------------- the tokenizer


def test_bpe_round_trips_text_and_is_deterministic():
    source = open_source(DataConfig(max_documents=SLICE))
    trained = train_bpe(source, 512, 0.05)
    assert train_bpe(source, 512, 0.05).to_str() == trained.to_str()  # another training, other hash seeds
    tokenizer = HFTokenizer(trained, "bpe", "bpe")
    assert tokenizer.vocab_size == 512 and tokenizer.separator.tolist() == [0]  # <|endoftext|>
    texts = [text.decode("utf-8") for _, text in source.documents()][:4]
    texts.append("caf\u00e9 \u2014 na\u00efve \U0001F600\n\ttabs  and   spaces\r\n")
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    code = texts[0].encode("utf-8")
    assert len(tokenizer.encode(texts[0])) < len(code) / 1.8  # it did learn merges


def test_bpe_sees_only_the_training_split(tmp_path):
    val_names = [f"d{i}.txt" for i in range(60) if is_val_document(f"d{i}.txt", 0.2)]
    assert 3 <= len(val_names) <= 30
    for i in range(60):
        name = f"d{i}.txt"
        (tmp_path / name).write_text("zqxv " * 400 if name in val_names else "the cat sat on the mat. " * 20)
    trained = train_bpe(open_source(DataConfig(dataset="files", path=str(tmp_path))), 300, 0.2)
    learned = [token for token in trained.get_vocab() if len(token) > 1 and token != "<|endoftext|>"]
    assert any("at" in token for token in learned)
    assert not any("zq" in token or "xv" in token for token in learned), learned


def test_model_vocab_must_hold_the_tokenizer(tmp_path):
    cfg = load_config(TINY, ["data.tokenizer=bpe", "data.bpe_vocab_size=512"])
    with pytest.raises(ConfigError, match="^model.vocab_size: data.tokenizer=bpe has 512 token ids, so it must be "
                                          ">= 512, got 256"):
        validate(cfg, 2)
    # a pretrained tokenizer's size is known once it loads: a local tokenizer.json here
    trained = train_bpe(open_source(DataConfig(max_documents=5)), 400, 0.05)
    trained.save(str(tmp_path / "tokenizer.json"))
    corpus = load_corpus(DataConfig(max_documents=5, tokenizer="pretrained", tokenizer_name=str(tmp_path),
                                    cache_dir=str(tmp_path / "cache")))
    assert corpus.tokenizer.fingerprint == HFTokenizer(trained, "bpe", "x").fingerprint
    with pytest.raises(DataError, match="^model.vocab_size: the tokenizer .* needs model.vocab_size >= 400, got 300"):
        check_corpus(corpus, 300, 32)
    check_corpus(corpus, 400, 32)


# ----------------------------------------------------------------------------- the shards


def test_the_shard_key_covers_the_tokenizer(tmp_path):
    (tmp_path / "docs").mkdir()
    texts = {f"f{i}.txt": f"file {i}: " + "lorem ipsum dolor sit amet, " * (5 + i % 9) for i in range(50)}
    for name, text in texts.items():
        (tmp_path / "docs" / name).write_text(text)
    train_text = "".join(text for name, text in sorted(texts.items()) if not is_val_document(name, 0.05))
    cache = tmp_path / "cache"
    paths = set()
    for tokenizer, vocab in (("bytes", 0), ("bpe", 300), ("bpe", 400)):
        cfg = DataConfig(dataset="files", path=str(tmp_path / "docs"), tokenizer=tokenizer,
                         bpe_vocab_size=vocab or 8192, cache_dir=str(cache))
        corpus = load_corpus(cfg)
        paths.add(corpus.shard_dir)
        ids = np.asarray(corpus.train)
        if tokenizer == "bytes":
            assert ids.tobytes() == "\n\n".join(t for n, t in sorted(texts.items())
                                                 if not is_val_document(n, 0.05)).encode()
        else:  # the separator is a special token, which decoding leaves out
            assert corpus.tokenizer.decode(ids) == train_text
            assert ids.max() < vocab
    assert len(paths) == 3, paths
    assert [b["built"] for b in builds(cache)] == ["tokens", "tokenizer", "tokens", "tokenizer", "tokens"]


def test_waiting_for_a_builder_is_bounded_and_names_it(tmp_path):
    (tmp_path / "a.txt").write_text("some text to tokenise\n" * 50)
    cfg = DataConfig(dataset="files", path=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "cache"))
    from trainer.data import BYTES

    key = shard_key(open_source(cfg), BYTES, cfg.val_fraction)
    lock = tmp_path / "cache" / "tokens" / f"{key}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as held:  # another builder (flock: another open file, even in this process)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        with pytest.raises(DataError, match=r"^data.cache_dir: waited 0s \(parallel.timeout_s\) for pid 4242 on "
                                            r"elsewhere, which is building token shards"):
            load_corpus(cfg, wait_s=0.3)
    assert "built in" in load_corpus(cfg, wait_s=0.3).cache  # the lock is free again: this process builds


def test_damaged_shards_are_named(tmp_path):
    (tmp_path / "a.txt").write_text("some text to tokenise\n" * 50)
    cfg = DataConfig(dataset="files", path=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "cache"))
    path = load_corpus(cfg).shard_dir
    with open(path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=f"^data.cache_dir: the token shards in {path} are damaged"):
        load_corpus(cfg)


def digests(directory: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*.bin"))}


def test_a_second_run_maps_the_shards_the_first_built_and_the_tokenizer_travels(tmp_path, capsys):
    cache = tmp_path / "cache"
    first = run_cli(["train", TINY, *SMALL, *BPE, f"data.cache_dir={cache}", f"run.dir={tmp_path / 'a'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert lines(first.stderr, "tokens: shards built in ") and "bpe tokenizer trained in" in first.stderr
    shards = digests(cache / "tokens")
    assert len(shards) == 2  # train.bin and val.bin of one entry
    second = run_cli(["train", TINY, *SMALL, *BPE, f"data.cache_dir={cache}", f"run.dir={tmp_path / 'b'}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert lines(second.stderr, "tokens: shards reused from the cache") and "bpe tokenizer reused" in second.stderr
    assert "reused from the cache (built in" not in second.stderr  # read as a contradiction: nothing was built now
    assert digests(cache / "tokens") == shards  # untouched: neither rewritten nor rebuilt
    assert [b["built"] for b in builds(cache)] == ["tokenizer", "tokens"]
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [r["loss"] for r in read_metrics(tmp_path / "b")]
    saved = (tmp_path / "a" / "tokenizer.json").read_text()
    assert (tmp_path / "b" / "tokenizer.json").read_text() == saved
    fingerprint = HFTokenizer(tokenizers.Tokenizer.from_str(saved), "bpe", "").fingerprint
    assert f"tokenizer {fingerprint})" in lines(first.stderr, "data: ")[0]

    # resume (in this process): the run's own tokenizer.json, the same tokens
    code, _, err = cli(capsys, "train", TINY, *SMALL, *BPE, "train.steps=3", f"data.cache_dir={cache}",
                       f"run.dir={tmp_path / 'a'}")
    assert code == 0, err
    assert f"bpe tokenizer from {tmp_path / 'a' / 'tokenizer.json'}" in err and "data differs" not in err
    # eval, export and sample read it too
    code, out, err = cli(capsys, "eval", str(tmp_path / "a"), f"data.cache_dir={cache}")
    assert code == 0, err
    assert f"tokenizer {fingerprint})" in json.loads(out)["data"]
    code, _, err = cli(capsys, "export", str(tmp_path / "a"), str(tmp_path / "export"))
    assert code == 0, err
    assert (tmp_path / "export" / "tokenizer.json").read_text() == saved
    code, out, err = cli(capsys, "sample", str(tmp_path / "export"), "--prompt", "def __init__(self", "--tokens", "8")
    assert code == 0, err
    assert out.startswith("def __init__(self")
    code, _, err = cli(capsys, "eval", str(tmp_path / "a"), "data.bpe_vocab_size=1024")
    assert code == 2 and err.startswith("error: config: data.bpe_vocab_size: eval reads text with the run's own")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_two_ranks_on_one_machine_tokenise_once(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [text.decode("utf-8") for _, text in open_source(DataConfig(max_documents=SLICE)).documents()]
    (tmp_path / "corpus").mkdir()
    for part in range(2):
        datasets.Dataset.from_dict({"text": texts[part::2]}).to_json(tmp_path / "corpus" / f"part{part}.jsonl")
    cache = tmp_path / "cache"
    result = run_cli(["train", TINY, *SMALL, "parallel.ep=2", "data.dataset=files", f"data.path={tmp_path / 'corpus'}",
                      "data.glob=*.jsonl", *BPE, f"data.cache_dir={cache}", f"run.dir={tmp_path / 'run'}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    made = builds(cache)
    assert [b["built"] for b in made] == ["tokenizer", "tokens"], made  # once, by one of the two ranks
    assert all("(rank " in b["by"] for b in made)
    line = lines(result.stderr, "tokens: shards built in ")
    assert len(line) == 1 and "bpe tokenizer" in line[0], result.stderr[-3000:]
    assert (tmp_path / "run" / "tokenizer.json").is_file()
