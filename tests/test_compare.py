"""`python -m trainer compare`: real runs (torchrun, gloo) per config and seed, a table whose
figures are the runs' own, reuse of finished runs, and one-line refusals before anything trains."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from trainer.run.tracking import read_metrics

from .cli import REPO
from .test_guards_cli import SMALL, TINY, cli, corpus, files_data, one_process  # noqa: F401

STEPS = 4
COMMON = [*SMALL, f"train.steps={STEPS}", "train.eval_every=2", "ckpt.every=0"]
MOE = f"{TINY}:parallel.ep=2"
DENSE = f"{TINY}:moe.num_experts=0,model.dense_d_ff=64"  # top-2 of 4 x 32: 64 active FFN units
DENSE_SLUG = "tiny-num_experts-0-dense_d_ff-64"


def compare(capsys, out, *items, seeds=2, nproc=2):
    return cli(capsys, "compare", *items, "--seeds", str(seeds), "--nproc", str(nproc), "--out", str(out))


def final_val(run_dir) -> float:
    return next(r["val_loss"] for r in read_metrics(run_dir) if r["step"] == STEPS and "val_loss" in r)


@pytest.mark.slow
def test_compare_tabulates_its_runs_reuses_them_and_refuses_a_stale_one(capsys, tmp_path, corpus):
    out = tmp_path / "cmp"
    data = files_data(corpus)
    code, stdout, err = compare(capsys, out, MOE, DENSE, *COMMON, *data)
    assert code == 0, err
    assert stdout.count("(trained,") == 4 and "reused" not in stdout
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "tiny-ep-2", "tiny-num_experts-0-dense_d_ff-64",
                                                    "val_loss.png"]
    table = json.loads((out / "compare.json").read_text())
    assert table["seeds"] == [1337, 1338]
    moe, dense = table["rows"]
    assert (moe["config"], dense["config"]) == ("tiny ep=2", "tiny num_experts=0 dense_d_ff=64")

    # every figure is the runs' own: val loss at the last step of each seed's metrics.jsonl
    for row, slug in ((moe, "tiny-ep-2"), (dense, "tiny-num_experts-0-dense_d_ff-64")):
        per_seed = [final_val(out / slug / f"seed{s}") for s in (1337, 1338)]
        assert [s["val_loss"] for s in row["seeds"]] == per_seed
        assert row["val_loss_mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert row["val_loss_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert moe["seeds"][0]["val_loss"] != moe["seeds"][1]["val_loss"]  # the seed reached the runs
    paired = [100 * (d["val_loss"] / m["val_loss"] - 1) for m, d in zip(moe["seeds"], dense["seeds"])]
    assert dense["rel_diff_pct"] == pytest.approx(np.mean(paired), abs=1e-9)
    assert dense["rel_diff_pct_std"] == pytest.approx(np.std(paired, ddof=1), abs=1e-9)

    # parameters: 1 layer, d_model 32, 4 experts of 32, top-2; dense FFN 64 wide
    experts, router = 4 * 3 * 32 * 32, 32 * 4
    assert moe["total_params"] - moe["active_params"] == experts // 2
    assert moe["active_params"] - dense["active_params"] == router
    assert dense["total_params"] == dense["active_params"]
    assert moe["tokens_per_s"] > 0 and moe["wall_s"] > 0
    assert moe["tokens_per_s"] == np.median([s["tokens_per_s"] for s in moe["seeds"]])
    markdown = (out / "compare.md").read_text()
    assert f"{moe['val_loss_mean']:.4f} ± {moe['val_loss_std']:.4f}" in markdown
    assert f"{dense['rel_diff_pct']:+.2f}%" in markdown and markdown in stdout

    matplotlib = pytest.importorskip("matplotlib")
    pixels = matplotlib.image.imread(out / "val_loss.png")
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, "val_loss.png looks blank"

    # again, with settings that cannot change a result: nothing trains, the same table
    code, stdout, err = compare(capsys, out, MOE, DENSE, *COMMON, *data, "ckpt.every=1", "run.log_every=2")
    assert code == 0, err
    assert stdout.count("(reused,") == 4 and "trained" not in stdout
    assert (out / "compare.md").read_text() == markdown

    # the final checkpoints evaluated afterwards, in one process, over the runs' own single val batch:
    # the figures the runs logged at their last step
    code, stdout, err = cli(capsys, "compare", MOE, DENSE, *COMMON, *data, "--seeds", "2", "--out", str(out),
                            "--eval-batches", "1")
    assert code == 0, err
    assert "val loss (mean ± std, 2 seeds, 1 val batch)" in stdout
    for row, slug in zip(json.loads((out / "compare.json").read_text())["rows"], ("tiny-ep-2", DENSE_SLUG)):
        for seed in row["seeds"]:
            assert seed["val_loss"] == pytest.approx(final_val(out / slug / f"seed{seed['seed']}"), rel=1e-5)

    # the same directories for another setting: refused before anything trains, nothing changed
    before = (out / "tiny-ep-2" / "seed1337" / "metrics.jsonl").read_text()
    code, stdout, err = compare(capsys, out, MOE, DENSE, *COMMON, *data, "train.lr=0.001")
    assert code == 2
    assert err.splitlines() == [f"error: compare: {out / 'tiny-ep-2' / 'seed1337'} holds a run with train.lr=0.003, "
                                f"this comparison wants 0.001; remove it or pass another --out"]
    assert (out / "tiny-ep-2" / "seed1337" / "metrics.jsonl").read_text() == before


def test_a_failed_run_stops_the_comparison_and_keeps_the_finished_ones(capsys, tmp_path, corpus):
    out = tmp_path / "cmp"
    diverging = f"{TINY}:train.lr=1e10,train.warmup_steps=0,train.grad_clip=0"
    old_log = out / "tiny-lr-1e10-warmup_steps-0-grad_clip-0" / "seed1337" / "compare.log"
    old_log.parent.mkdir(parents=True)
    old_log.write_text("error: an earlier attempt's failure\n")  # the log keeps every attempt; the reason is this one's
    code, stdout, err = compare(capsys, out, TINY, diverging, *COMMON, "train.steps=8", *files_data(corpus),
                                seeds=1, nproc=1)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: compare: training tiny lr=1e10 warmup_steps=0 "
                                                   "grad_clip=0 seed 1337 failed (exit 1); console in "), err
    assert "non-finite" in lines[0]  # the run's own error line
    assert "(trained," in stdout and final_val(out / "tiny" / "seed1337") > 0
    assert not (out / "compare.md").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_the_run_in_progress_and_the_same_command_resumes_it(tmp_path, corpus, signum):
    """Ctrl-C (or a scheduler's SIGTERM) reaches compare only, its runs having a session of their
    own; it sends the run one SIGTERM, waits for its checkpoint, exits 130, and the same command
    continues from there."""
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "trainer", "compare", TINY, *COMMON, "train.steps=400", *files_data(corpus),
            "--seeds", "1", "--nproc", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    metrics = out / "tiny" / "seed1337" / "metrics.jsonl"
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signum)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert err.splitlines()[-1].startswith(f"error: compare: interrupted; tiny seed 1337 ({out / 'tiny' / 'seed1337'}) "
                                           "saved a checkpoint, and the same command resumes it"), err
    stopped_at = read_metrics(out / "tiny" / "seed1337")[-1]["step"]
    assert 0 < stopped_at < 400

    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "(trained," in again.stdout
    assert f"step {stopped_at}" in (out / "tiny" / "seed1337" / "compare.log").read_text().split("resuming from")[-1]
    assert [r["step"] for r in read_metrics(out / "tiny" / "seed1337")] == list(range(1, 401))


@pytest.mark.parametrize("items, message", [
    ([TINY, f"{TINY}:train.steps=5"],
     "compare: tiny and tiny steps=5 differ in train.steps (4 vs 5); a comparison trains every config on the "
     "same tokens: pass train.steps=... to set it for all"),
    ([TINY, f"{TINY}:data.val_fraction=0.1"],
     "compare: tiny and tiny val_fraction=0.1 differ in data.val_fraction (0.05 vs 0.1); a comparison trains every "
     "config on the same tokens: pass data.val_fraction=... to set it for all"),
    ([TINY, f"{TINY}:moe.nope=1"], "config: tiny nope=1: moe.nope: unknown key"),
    ([TINY, f"{TINY}:moe.top_k"], f"compare: {TINY}:moe.top_k: after the colon come key=value overrides"),
    ([f"{TINY}:train.stop_at=2"], "compare: tiny stop_at=2: train.stop_at=2: every run trains to train.steps"),
    ([TINY, "train.deepspeed_config=ds.yaml", "train.steps=5"], "config: tiny: train."),
    ([TINY, "nonsense"], "compare: nonsense is neither a config file (.yaml) nor a key=value override"),
    ([TINY, TINY], "compare: two configs would share the run directory 'tiny'"),
    ([f"{TINY}:parallel.ep=2"], "config: tiny ep=2: parallel.ep"),
])
def test_configs_that_cannot_be_compared_are_refused_in_one_line(capsys, tmp_path, items, message):
    code, stdout, err = cli(capsys, "compare", *items, *COMMON, "--seeds", "1", "--nproc", "1",
                            "--out", str(tmp_path / "cmp"))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "cmp").exists()  # refused before anything trained
