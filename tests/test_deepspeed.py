"""DeepSpeed's engine (train.engine=deepspeed): ZeRO-1 and ZeRO-2 on 2 gloo processes follow the native
engine's per-step losses for configs/tiny.yaml at ep=2; checkpoints of either engine resume in the
other (at another EP size too); the `deepspeed` launcher runs it; bad settings are one line."""

import json
import os
import shutil
import subprocess

import pytest

from tests.cli import REPO, run_cli
from trainer.__main__ import main
from trainer.tracking import read_metrics

pytest.importorskip("deepspeed", reason="needs DeepSpeed (launch/setup.sh --dev or --deepspeed installs it)")

TINY = ["configs/tiny.yaml", "train.steps=4", "train.eval_every=0", "train.eval_batches=1", "run.log_every=1",
        "run.progress=false", "ckpt.every=2", "train.device=cpu", "parallel.timeout_s=120"]
ZERO = ["train.engine=deepspeed"]
TOLERANCE = 1e-4


def train(run_dir, *overrides, launcher=False):
    if launcher:
        env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(["bash", "launch/deepspeed.sh", *TINY, *overrides, f"run.dir={run_dir}"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    else:
        done = run_cli(["train", *TINY, *overrides, f"run.dir={run_dir}"], nproc=2, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_follows(got: dict[int, float], want: dict[int, float], steps: list[int]) -> float:
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) for s in steps)
    assert worst <= TOLERANCE, f"largest per-step loss difference {worst:.2e} over steps {steps}: {got} vs {want}"
    return worst


def resume_from_step_2(source, target, *overrides, launcher=False):
    """`target` is a copy of run `source` as it stood after step 2, continued with `overrides`."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step_0000004")
    done = train(target, *overrides, launcher=launcher)
    assert "resuming from" in done.stderr and "step 2" in done.stderr
    return done


@pytest.mark.slow
def test_zero_1_and_2_follow_the_native_engine_and_resume_across_engines(tmp_path):
    native = tmp_path / "native"
    train(native)
    want = losses(native)
    assert len(want) == 4
    worst = {}

    zero1 = tmp_path / "zero1"
    done = train(zero1, *ZERO, "train.zero_stage=1")
    assert "engine deepspeed ZeRO-1" in done.stderr
    worst["zero1"] = assert_follows(losses(zero1), want, [1, 2, 3, 4])

    # a native checkpoint resumes under ZeRO-2 (its AdamW state scattered into ZeRO's partitions),
    # started by DeepSpeed's own launcher
    zero2 = tmp_path / "native_then_zero2"
    done = resume_from_step_2(native, zero2, *ZERO, "train.zero_stage=2", launcher=True)
    assert "engine deepspeed ZeRO-2" in done.stderr and "world 2, ep 2" in done.stderr
    worst["native->zero2"] = assert_follows(losses(zero2), want, [3, 4])

    # a ZeRO-1 checkpoint (its state gathered from the partitions) resumes natively, at another EP size
    resume_from_step_2(zero1, tmp_path / "zero1_then_native", "parallel.ep=1")
    worst["zero1->native ep1"] = assert_follows(losses(tmp_path / "zero1_then_native"), want, [3, 4])
    print("largest per-step loss difference against the native engine:", json.dumps(worst))


def cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    return code, errors


@pytest.mark.parametrize("override, named", [
    ("train.zero_stage=3", "train.zero_stage: 3 is refused: ZeRO-3 partitions every parameter"),
    ("train.zero_stage=5", "train.zero_stage: must be 0, 1 or 2"),
    ("train.skip_nonfinite=2", "train.skip_nonfinite: must be 0 with train.engine=deepspeed"),
])
def test_unsupported_deepspeed_settings_are_one_line(capsys, tmp_path, override, named):
    code, errors = cli(capsys, "check", "--nproc", "2", *TINY, *ZERO, override, f"run.dir={tmp_path / 'run'}")
    assert code != 0 and len(errors) == 1 and named in errors[0], errors


@pytest.mark.parametrize("json_config, named", [
    ({"train_batch_size": 64}, "sets train_batch_size, which the trainer sets from train.batch_size"),
    ({"zero_optimization": {"stage": 3}}, "sets zero_optimization.stage, which the trainer sets from train.zero_stage"),
    ({"optimizer": {"type": "Adam"}}, "sets optimizer, which the trainer sets from train.lr"),
])
def test_deepspeed_json_keys_the_trainer_owns_are_refused_by_name(capsys, tmp_path, json_config, named):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}} | json_config))
    code, errors = cli(capsys, "check", "--nproc", "2", *TINY, *ZERO, f"train.deepspeed_config={path}", f"run.dir={tmp_path / 'run'}")
    assert code != 0 and len(errors) == 1 and named in errors[0] and str(path) in errors[0], errors


def test_deepspeed_settings_need_the_deepspeed_engine(capsys, tmp_path):
    code, errors = cli(capsys, "check", "--nproc", "2", *TINY, "train.zero_stage=1", f"run.dir={tmp_path / 'run'}")
    assert code != 0 and errors == ["error: config: train.zero_stage: needs train.engine=deepspeed, got 1"]
