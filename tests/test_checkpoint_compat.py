"""A checkpoint written by an older version of the trainer still resumes.

`fixtures/checkpoint_v1/step_0000004` was saved at step 4 by the trainer as it stood before its
modules were regrouped into layers (2 processes, ep 2; `expected.json` says how). Resuming it
must reproduce the losses that version logged for steps 5-8 of the same run: on the layout
that saved it, and re-sharded onto one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.run.tracking import read_metrics

from .cli import REPO, run_cli

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"


@pytest.mark.parametrize("nproc, ep, rel", [(2, 2, 1e-6), (1, 1, 1e-5)])
def test_a_checkpoint_from_before_the_regrouping_resumes_to_the_losses_it_would_have_had(tmp_path, nproc, ep, rel):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(FIXTURE / "step_0000004", run_dir / "checkpoints" / "step_0000004")
    result = run_cli(["train", "configs/tiny.yaml", *expected["overrides"], f"parallel.ep={ep}",
                      f"data.path={(FIXTURE / 'corpus.txt').relative_to(REPO)}", f"data.cache_dir={tmp_path / 'cache'}",
                      f"run.dir={run_dir}"], nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    records = read_metrics(run_dir)
    losses = {str(r["step"]): r["loss"] for r in records if "loss" in r}
    assert sorted(losses, key=int) == ["5", "6", "7", "8"]  # steps 1-4 come from the checkpoint
    for step, loss in expected["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=rel, abs=0), f"step {step}"
    val = next(r["val_loss"] for r in records if "val_loss" in r)
    assert val == pytest.approx(expected["val_loss_step_8"], rel=rel, abs=0)
