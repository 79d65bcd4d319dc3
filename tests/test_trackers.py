"""Trackers write a real run: tensorboard event files hold the logged scalars and the config; wandb
(offline, no network) writes its run under run.dir and a resumed run continues the same wandb run."""

import shutil

import pytest

from tests.cli import REPO, run_cli
from trainer.run.tracking import read_metrics

RUN = ["configs/tiny.yaml", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
       "moe.num_experts=4", "moe.d_ff=32", "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1",
       "run.progress=false", "run.log_every=1", "parallel.ep=1", "train.device=cpu", "data.dataset=files",
       f"data.path={REPO / 'README.md'}"]


def test_tensorboard_run_holds_the_logged_scalars_and_config(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra (launch/setup.sh --dev has it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    args = ["train", *RUN, "train.steps=4", "ckpt.every=2", "run.tracker=tensorboard", f"run.dir={run_dir}"]
    done = run_cli(args, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # as after a crash past step 2's checkpoint: the rerun logs steps 3 and 4 again, and they count once
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    done = run_cli(args, timeout=120)
    assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-2000:]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    logged = {r["step"]: r for r in read_metrics(run_dir)}
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([logged[s]["loss"] for s in (1, 2, 3, 4)], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_wandb_offline_run_is_written_and_continued_on_resume(tmp_path):
    pytest.importorskip("wandb", reason="needs the wandb extra (launch/setup.sh --dev has it)")
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    first = run_cli(["train", *RUN, "train.steps=2", "run.tracker=wandb", f"run.dir={run_dir}"], env=env, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    wandb_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), list((run_dir / "wandb").iterdir())

    second = run_cli(["train", *RUN, "train.steps=4", "run.tracker=wandb", f"run.dir={run_dir}"], env=env,
                     timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stderr
    assert (run_dir / "wandb_id.txt").read_text().strip() == wandb_id  # the same wandb run, continued
    assert len(sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2  # one directory per session
