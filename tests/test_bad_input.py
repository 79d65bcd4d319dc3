"""Bad input is one `error:` line naming the file, key or variable, exit 2, and nothing saved changes.

Each case was a traceback before (found by an adversarial sweep of the CLI): the paths every
subcommand takes, the launcher's environment variables, and values that only a library
further down used to reject. Runs are in this process (`trainer.__main__.main`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from .test_guards_cli import SMALL, TINY, cli, corpus, error_lines, files_data, one_process  # noqa: F401 (fixtures)

UNREADABLE = "/proc/self/mem"  # a regular file that cannot be read from its start, even by root


def one_error(code: int, err: str, *expected: str) -> str:
    lines = error_lines(err)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A finished 3-step run to export, sample and resume from."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    from trainer.__main__ import main

    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORLD_SIZE", "1")
        for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.delenv(name, raising=False)
        assert main(["train", TINY, *SMALL, *files_data(corpus), f"run.dir={run_dir}"]) == 0
    return run_dir


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- configs and corpora


def test_a_config_that_is_not_utf8_is_one_line(capsys, tmp_path, corpus):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"model:\n  d_model: \xff\xfe\n")
    code, _, err = cli(capsys, "train", str(config), *SMALL, *files_data(corpus), f"run.dir={tmp_path / 'run'}")
    one_error(code, err, str(config), "not UTF-8")


def test_a_config_that_cannot_be_read_is_one_line(capsys, tmp_path, corpus):
    code, _, err = cli(capsys, "check", UNREADABLE, *SMALL, *files_data(corpus), f"run.dir={tmp_path / 'run'}")
    one_error(code, err, UNREADABLE, "cannot be read")


@pytest.mark.parametrize("where", ["data.path", "a file of a data.path directory"])
def test_a_corpus_file_that_cannot_be_read_is_one_line(capsys, tmp_path, where):
    if where == "data.path":
        data = ["data.dataset=files", f"data.path={UNREADABLE}"]
    else:
        folder = tmp_path / "texts"
        folder.mkdir()
        (folder / "a.txt").write_text("readable " * 500)
        os.symlink(UNREADABLE, folder / "b.txt")
        data = ["data.dataset=files", f"data.path={folder}", "data.glob=*.txt"]
    code, _, err = cli(capsys, "train", TINY, *SMALL, *data, f"data.cache_dir={tmp_path / 'cache'}",
                       f"run.dir={tmp_path / 'run'}")
    one_error(code, err, "data.path", "cannot be read")


def test_a_pretrained_tokenizer_with_no_vocabulary_is_one_line(capsys, tmp_path, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    empty = tmp_path / "tokenizer.json"
    tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(empty))
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "data.tokenizer=pretrained",
                       f"data.tokenizer_name={empty}", f"data.cache_dir={tmp_path / 'cache'}",
                       f"run.dir={tmp_path / 'run'}")
    one_error(code, err, "data.tokenizer_name", "empty vocabulary")


def test_a_deepspeed_value_deepspeed_rejects_is_one_line_naming_it(capsys, tmp_path, corpus):
    pytest.importorskip("deepspeed")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": -5}}))
    code, _, err = cli(capsys, "check", TINY, *SMALL, *files_data(corpus), "train.engine=deepspeed",
                       "train.zero_stage=1", f"train.deepspeed_config={ds}", f"run.dir={tmp_path / 'run'}")
    one_error(code, err, "train.deepspeed_config", str(ds), "zero_optimization.reduce_bucket_size", "greater than 0")


def test_a_run_dir_name_longer_than_the_file_system_allows_is_one_line(capsys, tmp_path, corpus):
    run_dir = tmp_path / ("x" * 300)
    for command in ("check", "train"):
        code, _, err = cli(capsys, command, TINY, *SMALL, *files_data(corpus), f"run.dir={run_dir}")
        one_error(code, err, "run.dir", "too long")


def test_a_timeout_no_process_group_can_take_is_one_line(capsys, tmp_path, corpus):
    code, _, err = cli(capsys, "check", TINY, *SMALL, *files_data(corpus), "parallel.timeout_s=1e30",
                       f"run.dir={tmp_path / 'run'}")
    one_error(code, err, "parallel.timeout_s")


# ----------------------------------------------------------------------------- the launcher's variables


@pytest.mark.parametrize("env,variable", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),  # a shell left over from a torchrun session
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, "MASTER_PORT"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK"),
    ({"LOCAL_WORLD_SIZE": "two"}, "LOCAL_WORLD_SIZE"),
])
def test_launcher_variables_that_cannot_be_true_are_one_line_naming_the_variable(capsys, tmp_path, corpus,
                                                                                 monkeypatch, env, variable):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), f"run.dir={tmp_path / 'run'}")
    line = one_error(code, err, variable)
    assert line.startswith(f"error: launch: {variable}")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- output directories


@pytest.mark.parametrize("fmt", ["native", "hf"])
@pytest.mark.parametrize("where", ["an existing file", "under a file", "/proc"])
def test_export_to_a_place_that_cannot_hold_a_directory_is_one_line(capsys, tmp_path, trained, fmt, where):
    if fmt == "hf":
        pytest.importorskip("transformers")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    out = {"an existing file": a_file, "under a file": a_file / "out", "/proc": Path("/proc/moe-trainer-export")}[where]
    before = digest(trained)
    code, _, err = cli(capsys, "export", str(trained), str(out), "--format", fmt)
    one_error(code, err, "export OUT_DIR", str(out))
    assert a_file.read_text() == "keep me\n" and digest(trained) == before


def test_compare_and_report_outputs_under_a_file_are_one_line(capsys, tmp_path, trained, corpus):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    code, _, err = cli(capsys, "compare", TINY, "--seeds", "1", "--nproc", "1", "--out", str(a_file / "out"), *SMALL,
                       *files_data(corpus))
    one_error(code, err, "compare --out", str(a_file / "out"))
    code, _, err = cli(capsys, "report", str(trained), "--out", str(a_file / "plots"))
    one_error(code, err, "--out", str(a_file / "plots"))
    assert a_file.read_text() == "keep me\n"


# ----------------------------------------------------------------------------- sample's numbers


@pytest.mark.parametrize("flags,named", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--tokens", "-1"], "--tokens"),
    (["--tokens", "1000000000000"], "--tokens"),
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "100000"], "--top-k"),  # more than the model's 256 ids
])
def test_sample_numbers_out_of_range_are_one_line_naming_the_flag(capsys, trained, flags, named):
    code, out, err = cli(capsys, "sample", str(trained), *flags)
    one_error(code, err, f"sample: {named}")
    assert out == ""


# ----------------------------------------------------------------------------- a damaged metrics.jsonl


def test_metrics_that_are_not_utf8_refuse_resume_and_report_in_one_line_and_stay_as_they_were(capsys, tmp_path,
                                                                                                trained, corpus):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "note": "\xff"}\n')
    before = digest(run_dir)
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "train.steps=5", f"run.dir={run_dir}")
    one_error(code, err, "run.dir", "metrics.jsonl", "line 4", "not UTF-8")
    code, _, err = cli(capsys, "report", str(run_dir), "--out", str(tmp_path / "plots"))
    one_error(code, err, "metrics.jsonl", "line 4")
    assert digest(run_dir) == before


def test_a_wandb_mode_wandb_would_reject_is_one_line_naming_the_variable(capsys, tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "bogus")
    code, _, err = cli(capsys, "check", TINY, *SMALL, *files_data(corpus), "run.tracker=wandb",
                       f"run.dir={tmp_path / 'run'}")
    one_error(code, err, "WANDB_MODE='bogus'", "offline")
