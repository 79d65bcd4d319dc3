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
from trainer.run.tracking import read_metrics

pytest.importorskip("deepspeed", reason="needs DeepSpeed (launch/setup.sh --dev or --deepspeed installs it)")

# warmup 1: the full learning rate from the first step, so a wrong gradient shows in the losses;
# expert_lr_scale: DeepSpeed regroups the expert parameters, and their scaled lr must survive that
TINY = ["configs/tiny.yaml", "train.steps=4", "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1",
        "run.log_every=1", "run.progress=false", "ckpt.every=2", "train.device=cpu", "parallel.timeout_s=120",
        "train.expert_lr_scale=0.5"]
ZERO = ["train.engine=deepspeed"]
TOLERANCE = 1e-4  # per-step loss, absolute
NORM_TOLERANCE = 1e-5  # gradient norm, relative: AdamW hides a gradient's scale from the loss, the norm does not


def train(run_dir, *overrides, launcher=False):
    if launcher:
        env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(["bash", "launch/deepspeed.sh", *TINY, *overrides, f"run.dir={run_dir}"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    else:
        done = run_cli(["train", *TINY, *overrides, f"run.dir={run_dir}"], nproc=2, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def losses(run_dir) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm)"""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r}


def assert_follows(got: dict, want: dict, steps: list[int]) -> dict[str, float]:
    assert sorted(got) == sorted(want)
    loss = max(abs(got[s][0] - want[s][0]) for s in steps)
    norm = max(abs(got[s][1] - want[s][1]) / want[s][1] for s in steps)
    assert loss <= TOLERANCE, f"largest per-step loss difference {loss:.2e} over steps {steps}: {got} vs {want}"
    assert norm <= NORM_TOLERANCE, f"largest relative grad_norm difference {norm:.2e} over {steps}: {got} vs {want}"
    return {"loss": loss, "grad_norm_rel": norm}


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
    ds_json = tmp_path / "ds.json"  # settings the trainer does not own pass through to DeepSpeed
    ds_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 100000}}))
    # with the MoE layers recomputed in backward: DeepSpeed's engine sees only the hooks
    done = train(zero1, *ZERO, "train.zero_stage=1", f"train.deepspeed_config={ds_json}",
                 "train.activation_checkpointing=moe")
    assert "engine deepspeed ZeRO-1, activation checkpointing moe" in done.stderr
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
    print("largest differences against the native engine:", json.dumps(worst))

    # a DeepSpeed run's checkpoint is read without DeepSpeed's JSON (or DeepSpeed): the native engine
    ds_json.unlink()
    evaluated = run_cli(["eval", str(zero1)], timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["step"] == 4


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
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "sets zero_optimization.offload_optimizer"),
    ({"zero_optimization": {"reduce_scatter": False}}, "sets zero_optimization.reduce_scatter=false"),
    ({"zero_optimization": "fast"}, "zero_optimization must be a JSON object"),
])
def test_deepspeed_json_keys_the_trainer_owns_are_refused_by_name(capsys, tmp_path, json_config, named):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"steps_per_print": 10, "zero_optimization": {"reduce_bucket_size": 1000}} | json_config))
    code, errors = cli(capsys, "check", "--nproc", "2", *TINY, *ZERO, f"train.deepspeed_config={path}", f"run.dir={tmp_path / 'run'}")
    assert code != 0 and len(errors) == 1 and named in errors[0] and str(path) in errors[0], errors


def test_deepspeed_settings_need_the_deepspeed_engine(capsys, tmp_path):
    code, errors = cli(capsys, "check", "--nproc", "2", *TINY, "train.zero_stage=1", f"run.dir={tmp_path / 'run'}")
    assert code != 0 and errors == ["error: config: train.zero_stage: needs train.engine=deepspeed, got 1"]


def _group_timeouts_worker(rank, world_size):
    import datetime

    import torch
    from deepspeed.utils import groups as ds_groups

    from trainer.build import build_model
    from trainer.config import config_from_dict
    from trainer.engines import build_engine
    from trainer.parallel.dist import make_layout

    cfg = config_from_dict({}, ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
                                "moe.num_experts=4", "moe.d_ff=32", "train.batch_size=4", "parallel.ep=2",
                                "parallel.timeout_s=7", "train.engine=deepspeed", "train.zero_stage=2"])
    layout = make_layout(cfg.parallel, torch.device("cpu"))
    engine = build_engine(cfg, build_model(cfg, layout), layout)
    groups = {"DeepSpeed's world copy": ds_groups._WORLD_GROUP, "ZeRO's data-parallel group": engine.zero.dp_process_group,
              **{f"expert group {name}": g for name, g in ds_groups._EXPERT_PARALLEL_GROUP.items()},
              **{f"expert replica group {name}": g for name, g in ds_groups._EXPERT_DATA_PARALLEL_GROUP.items()}}
    for name, group in groups.items():
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        assert timeout == datetime.timedelta(seconds=7), f"{name}: timeout {timeout}, parallel.timeout_s=7"


@pytest.mark.slow
def test_every_group_deepspeed_uses_honours_parallel_timeout_s():
    """Otherwise a dead peer during a ZeRO reduction hangs for torch's default 30 minutes."""
    from tests.distributed import run_processes

    run_processes(_group_timeouts_worker, 2, timeout_s=120.0)


@pytest.mark.parametrize("stage, expected", [(0, 16), (1, 4 + 4 + 12 / 4), (2, 4 + 16 / 4)])
def test_the_memory_check_counts_what_zero_partitions(stage, expected):
    """Weights 4 B, gradients 4 B, AdamW moments 8 B per parameter; ZeRO adds an fp32 master copy (4 B)
    and partitions it with the moments (stage 1) and the gradients (stage 2) over the world (here 4)."""
    from trainer.config import config_from_dict
    from trainer.run.preflight import bytes_per_param

    engine = ["train.engine=deepspeed", f"train.zero_stage={stage}"] if stage else []
    assert bytes_per_param(config_from_dict({}, engine), world_size=4) == pytest.approx(expected)
