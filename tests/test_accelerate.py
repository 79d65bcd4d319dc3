"""`accelerate launch` with 2 CPU processes trains exactly as torchrun does: the same per-step
losses and gradient norms (launch/accelerate.sh is what users run)."""

import os
import subprocess

import pytest

from tests.cli import REPO, run_cli
from trainer.run.tracking import read_metrics

pytest.importorskip("accelerate", reason="needs the accelerate extra (launch/setup.sh --dev has it)")

RUN = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32", "moe.num_experts=4",
       "moe.d_ff=32", "train.batch_size=8", "train.steps=4", "train.eval_every=0", "train.eval_batches=1",
       "run.progress=false", "run.log_every=1", "parallel.ep=2", "data.dataset=files",
       f"data.path={REPO / 'README.md'}"]


@pytest.mark.slow
def test_accelerate_launch_matches_torchrun(tmp_path):
    torchrun = run_cli(["train", "configs/tiny.yaml", *RUN, f"run.dir={tmp_path / 'torchrun'}"], nproc=2)
    assert torchrun.returncode == 0, torchrun.stderr[-2000:]
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    accel = subprocess.run(["bash", "launch/accelerate.sh", "configs/tiny.yaml", *RUN,
                            f"run.dir={tmp_path / 'accelerate'}"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert accel.returncode == 0, accel.stderr[-2000:]
    assert "layout: world 2, ep 2" in accel.stderr
    ours, theirs = (read_metrics(tmp_path / name) for name in ("torchrun", "accelerate"))
    steps = [(r["step"], r["loss"], r["grad_norm"]) for r in ours if "loss" in r]
    assert len(steps) == 4
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in theirs if "loss" in r] == steps
