"""`python -m trainer report`: PNGs that decode and show something, from a MoE run (with
per-expert counts) overlaid with a dense run; bad input is one line."""

import numpy as np
import pytest

from .test_guards_cli import SMALL, TINY, cli, corpus, files_data  # noqa: F401

matplotlib = pytest.importorskip("matplotlib", reason="report needs the plot extra (launch/setup.sh --dev has it)")


def train(capsys, run_dir, corpus, *overrides):
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "train.steps=8", "train.eval_every=4",
                       "ckpt.every=0", f"run.dir={run_dir}", *overrides)
    assert code == 0, err


def test_report_writes_loss_routing_and_expert_load_pngs(capsys, tmp_path, corpus):
    moe, dense, out = tmp_path / "moe", tmp_path / "dense", tmp_path / "plots"
    train(capsys, moe, corpus, "run.log_expert_counts=true", "moe.capacity_factor=1.0")
    train(capsys, dense, corpus, "moe.num_experts=0")
    code, stdout, err = cli(capsys, "report", str(moe), str(dense), "--out", str(out))
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["expert_load_moe.png", "loss.png", "routing.png"]
    assert stdout.count("wrote ") == 3
    for path in out.iterdir():
        pixels = matplotlib.image.imread(path)  # decodes
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
        assert len(colours) > 50, f"{path.name} looks blank"  # lines, markers, a heatmap: many colours


def test_report_defaults_to_the_first_run_dir_and_names_missing_counts(capsys, tmp_path, corpus):
    run = tmp_path / "run"
    train(capsys, run, corpus)
    code, _, err = cli(capsys, "report", str(run))
    assert code == 0, err
    assert (run / "loss.png").is_file() and (run / "routing.png").is_file()
    assert "run.log_expert_counts=true" in err


def test_report_on_a_directory_without_metrics_is_one_line(capsys, tmp_path):
    code, _, err = cli(capsys, "report", str(tmp_path))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: report: ") and "metrics.jsonl" in err
