"""`compare --budget-seconds` and `compare --horizons`: real runs (one process each, gloo-free), the
figures in the tables are the runs' own, and each budget run trains exactly the steps its
config's measured speed fits in the budget, its schedule decaying there."""

import json
import math

import pytest

from trainer.build import lr_at
from trainer.config import load_config
from trainer.run.tracking import read_metrics

from .test_compare import COMMON, DENSE, DENSE_SLUG
from .test_guards_cli import TINY, cli, corpus, files_data  # noqa: F401

BUDGET_S = 1.5


def test_each_config_trains_the_steps_its_speed_fits_in_the_budget(capsys, tmp_path, corpus):
    out = tmp_path / "cmp"
    data = files_data(corpus)
    code, stdout, err = cli(capsys, "compare", TINY, DENSE, *COMMON, *data, "train.warmup_steps=1", "--seeds", "2",
                            "--nproc", "1", "--out", str(out), "--budget-seconds", str(BUDGET_S))
    assert code == 0, err
    summary = json.loads((out / "compare.json").read_text())
    equal_steps, timed = summary["rows"], summary["equal_time"]["rows"]
    budget = out / f"budget_{BUDGET_S:g}s"
    fixed = json.loads((budget / "budget_steps.json").read_text())
    for row, slug in zip(equal_steps, ("tiny", DENSE_SLUG)):
        # the steps: the budget at this config's median measured tokens/s, batch 4 x 32 tokens a step
        expected = math.floor(BUDGET_S * row["tokens_per_s"] / (4 * 32))
        assert fixed[row["config"]] == expected
        budget_row = next(r for r in timed if r["config"] == row["config"])
        assert budget_row["steps"] == expected and budget_row["tokens"] == expected * 4 * 32
        for seed in (1337, 1338):
            records = read_metrics(budget / slug / f"seed{seed}")
            assert records[-1]["step"] == expected and records[-1]["val_loss"] is not None
            # the schedule was planned for the budget's steps: its last lr is that schedule's
            planned = load_config(TINY, [*COMMON, "train.warmup_steps=1", *row["overrides"], f"train.steps={expected}"])
            assert records[-1]["lr"] == pytest.approx(lr_at(expected - 1, planned), rel=1e-9)
        assert [s["val_loss"] for s in budget_row["seeds"]] == [
            next(r["val_loss"] for r in read_metrics(budget / slug / f"seed{s}") if r["step"] == expected
                 and "val_loss" in r) for s in (1337, 1338)]
    assert fixed[equal_steps[1]["config"]] > fixed[equal_steps[0]["config"]], "a dense step is cheaper here"
    markdown = (out / "compare.md").read_text()
    assert f"Equal time: {BUDGET_S:g} s of training steps per run" in markdown
    paired = [100 * (d["val_loss"] / m["val_loss"] - 1) for m, d in zip(timed[0]["seeds"], timed[1]["seeds"])]
    assert timed[1]["rel_diff_pct"] == pytest.approx(sum(paired) / 2, abs=1e-9)
    assert f"{timed[1]['rel_diff_pct']:+.2f}%" in markdown

    # again: the steps fixed the first time are kept, so every run is reused
    code, stdout, err = cli(capsys, "compare", TINY, DENSE, *COMMON, *data, "train.warmup_steps=1", "--seeds", "2",
                            "--nproc", "1", "--out", str(out), "--budget-seconds", str(BUDGET_S))
    assert code == 0, err
    assert "trained" not in stdout and stdout.count("reused") == 8
    assert json.loads((budget / "budget_steps.json").read_text()) == fixed


def test_a_budget_too_small_for_the_warmup_is_refused_in_one_line(capsys, tmp_path, corpus):
    code, _, err = cli(capsys, "compare", TINY, *COMMON, *files_data(corpus), "--seeds", "1", "--nproc", "1",
                       "--out", str(tmp_path / "cmp"), "--budget-seconds", "0.0001")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: compare --budget-seconds 0.0001: tiny fits 0 steps, not more than its "
                          "train.warmup_steps=")
    code, _, err = cli(capsys, "compare", TINY, *COMMON, "--budget-seconds", "-1", "--out", str(tmp_path / "c2"))
    assert code == 2 and err.strip() == "error: compare: --budget-seconds must be a number of seconds > 0, got -1.0"


def test_horizons_run_the_whole_comparison_at_each_length(capsys, tmp_path, corpus):
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", TINY, DENSE, *COMMON, *files_data(corpus), "train.warmup_steps=1",
                            "--seeds", "1", "--nproc", "1", "--out", str(out), "--horizons", "6,3")
    assert code == 0, err
    summary = json.loads((out / "horizons.json").read_text())
    assert summary["horizons"] == [3, 6]
    markdown = (out / "horizons.md").read_text()
    assert "| config | 3 steps | 6 steps |" in markdown
    for n in (3, 6):
        rows = json.loads((out / f"steps{n}" / "compare.json").read_text())["rows"]
        assert summary["rows"][str(n)] == rows
        for row, slug in zip(rows, ("tiny", DENSE_SLUG)):
            assert read_metrics(out / f"steps{n}" / slug / "seed1337")[-1]["step"] == n
            assert f"{row['val_loss_mean']:.4f} ({row['rel_diff_pct']:+.2f}%)" in markdown
    assert summary["rows"]["3"][0]["val_loss_mean"] != summary["rows"]["6"][0]["val_loss_mean"]
    matplotlib = pytest.importorskip("matplotlib")
    assert matplotlib.image.imread(out / "horizons.png").size > 0

    code, _, err = cli(capsys, "compare", TINY, *COMMON, "--horizons", "4,x", "--out", str(tmp_path / "c2"))
    assert code == 2 and "--horizons takes steps separated by commas (400,800,1600), got '4,x'" in err
