"""Bad configuration: one line naming the key, a non-zero exit, before any process group exists."""

import os
import subprocess
import sys

import pytest
import torch

from trainer.__main__ import main
from trainer.config import ConfigError, config_from_dict, load_config
from trainer.config_validation import validate

from .cli import REPO, run_cli

TINY = str(REPO / "configs" / "tiny.yaml")

BAD = [
    # (overrides, world size, key the message must start with)
    (["moe.nmu_experts=4"], 2, "moe.nmu_experts"),
    (["model.d_model=abc"], 2, "model.d_model"),
    (["moe.top_k=2.5"], 2, "moe.top_k"),
    (["parallel.ep=true"], 2, "parallel.ep"),
    (["moe.num_experts=6", "parallel.ep=4"], 4, "moe.num_experts"),
    (["parallel.ep=2"], 3, "parallel.ep"),
    (["moe.top_k=0"], 2, "moe.top_k"),
    (["moe.top_k=9"], 2, "moe.top_k"),
    (["moe.capacity_factor=0"], 2, "moe.capacity_factor"),
    (["moe.capacity_factor=-1.5"], 2, "moe.capacity_factor"),
    (["train.batch_size=6", "parallel.ep=1"], 4, "train.batch_size"),
    (["train.grad_accum=3"], 2, "train.grad_accum"),
    (["model.n_heads=5"], 2, "model.n_heads"),
    (["run.tracker=mlflow"], 2, "run.tracker"),
    (["train"], 2, "train"),
]


@pytest.mark.parametrize("overrides, world_size, key", BAD, ids=[b[2] + ":" + " ".join(b[0]) for b in BAD])
def test_bad_config_exits_with_one_line_naming_the_key(overrides, world_size, key, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # rank 0 of a launch: the launcher sets both
    monkeypatch.setenv("MASTER_PORT", "29500")
    code = main(["train", TINY, *overrides, f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: config: {key}"), err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n  d_model: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"^model.d_model: expected an integer"):
        load_config(bad)


def test_overrides_keep_types_and_accept_null_and_exponents():
    cfg = load_config(TINY, ["moe.capacity_factor=1.25", "train.lr=3e-4", "moe.capacity_factor=null", "train.steps=7"])
    assert cfg.moe.capacity_factor is None and cfg.train.lr == 3e-4 and cfg.train.steps == 7
    validate(cfg, world_size=2)


EXPECTED_LINE = "error: config: moe.num_experts: moe.num_experts=6 is not divisible by parallel.ep=4"


def test_every_rank_fails_before_any_process_group_and_the_line_is_printed_once(tmp_path):
    """Four real ranks with no launcher and no peers: had any of them tried to create a process
    group it would wait for the others until the timeout instead of exiting at once. Every rank
    exits 2; the line is printed once, by whichever rank gets there first (run/error_once.py)."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "trainer", "train", TINY, "moe.num_experts=6", "parallel.ep=4",
                          f"run.dir={tmp_path / 'run'}"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "RANK": str(r), "LOCAL_RANK": str(r),
                              "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
        for r in range(4)
    ]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [2, 2, 2, 2], results
    assert sorted(err for _, err in results) == ["", "", "", EXPECTED_LINE + "\n"], results


def test_torchrun_reports_the_config_error(tmp_path):
    # torchrun stops the other ranks once one fails, so not every rank may get to print
    result = run_cli(["train", TINY, "moe.num_experts=6", "parallel.ep=4", f"run.dir={tmp_path / 'run'}"], nproc=4)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert lines and set(lines) == {EXPECTED_LINE}, result.stderr


def test_existing_run_dir_is_refused_and_left_alone(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = main(["train", TINY, "parallel.ep=1", f"run.dir={run_dir}"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: run.dir:")
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_every_config_key_is_listed_with_its_default_and_a_meaning(capsys):
    import dataclasses

    from trainer.__main__ import main
    from trainer.config import Config, load_config, to_dict
    from trainer.config_keys import config_keys

    rows = config_keys()
    defaults = to_dict(Config())
    expected = {f"{section}.{key}" for section, values in defaults.items() for key in values}
    assert {key for key, _, _ in rows} == expected
    assert [key for key, _, meaning in rows if not meaning] == [], "a config field without a comment"
    # each listed default, given back as an override, yields the default config
    assert to_dict(load_config(None, [f"{key}={default}" for key, default, _ in rows])) == defaults
    assert len(dataclasses.fields(Config)) == len(defaults)
    assert main(["config"]) == 0
    listing = capsys.readouterr().out
    for key, default, meaning in rows:
        assert any(line.split()[:2] == [key, default] and line.endswith(meaning) for line in listing.splitlines()), key
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert all(key in help_text for key, _, _ in rows)


def test_eval_batches_0_is_the_whole_validation_split_once():
    from trainer.build import eval_batch_count
    from trainer.data import TokenBatches

    cfg = config_from_dict({}, ["train.eval_batches=0", "train.batch_size=4"])
    validate(cfg, 1)
    batches = TokenBatches(torch.zeros(1000, dtype=torch.uint8), 16, 4, 0, 1, 0, False, "val")
    assert batches.num_windows == 62 and eval_batch_count(cfg, batches) == 15  # 60 of 62 windows, none twice
    cfg.train.eval_batches = 3
    assert eval_batch_count(cfg, batches) == 3
    with pytest.raises(ConfigError, match="train.eval_batches"):
        validate(config_from_dict({}, ["train.eval_batches=-1"]), 1)
