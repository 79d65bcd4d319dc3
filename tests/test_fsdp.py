"""The FSDP2 engine (train.engine=fsdp) trains exactly like the native one, on real gloo processes.

Parity, fp32 and dropless, per-step loss and gradient norm to 1e-5, at (world 2, ep 2), (world 4,
ep 2: experts with replicas, sharded over them) and (world 4, ep 4: one replica, experts unsharded),
with gradient accumulation and with the `global_batch` balance scope, resharding after forward or
not, and with activation checkpointing; after the steps every parameter agrees too. A planted fault
(expert gradients averaged over their replica group only, the factor-of-ep bug) must break parity.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch.distributed.tensor import DTensor

from trainer.build import build_trainer
from trainer.parallel.dist import make_layout
from trainer.run.tracking import read_metrics

from .cli import run_cli
from .distributed import run_processes
from .test_training_invariants import CPU, random_steps, small_config

STEPS = 3
TOLERANCE = 1e-5


def _steps(cfg, layout, seed: int = 0):
    """Per-step (losses, grad_norm) and the full parameters afterwards, for this rank's rows."""
    tr = build_trainer(cfg, layout)
    history = [(r.losses, r.grad_norm) for r in random_steps(tr, STEPS, 3e-3, seed)]
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in tr.model.named_parameters()}
    return history, params


def assert_same_training(got, want, what: str) -> None:
    (got_steps, got_params), (want_steps, want_params) = got, want
    for step, ((loss, norm), (loss_ref, norm_ref)) in enumerate(zip(got_steps, want_steps)):
        worst = max(abs(a - b) for a, b in zip(loss, loss_ref))
        assert worst <= TOLERANCE, f"{what}: step {step} losses {loss} vs native {loss_ref}"
        assert abs(norm - norm_ref) <= TOLERANCE * norm_ref, f"{what}: step {step} grad norm {norm} vs {norm_ref}"
    for name, ref in want_params.items():
        assert torch.allclose(got_params[name], ref, rtol=0, atol=TOLERANCE), f"{what}: {name} after {STEPS} steps"


VARIANTS = {  # name -> (train overrides, moe overrides)
    "plain": ({}, {}),
    "grad_accum_2": ({"grad_accum": 2}, {}),
    "global_batch_scope": ({}, {"aux_loss_scope": "global_batch"}),
    "no_reshard_full_recompute": ({"reshard_after_forward": False, "activation_checkpointing": "full"}, {}),
    "moe_recompute": ({"activation_checkpointing": "moe"}, {}),
}


def _parity_worker(rank, world_size, ep, variants, plant):
    for name in variants:
        train, moe = VARIANTS[name]
        cfg = small_config(ep, 8, warmup_steps=1, **train)
        for key, value in moe.items():
            setattr(cfg.moe, key, value)
        layout = make_layout(cfg.parallel, CPU)
        native = _steps(cfg, layout)
        cfg.train.engine = "fsdp"
        if plant:  # expert gradients divided by their replica count, not the world: `ep` times too large
            from torch.distributed.fsdp import FSDPModule

            original = FSDPModule.set_gradient_divide_factor
            FSDPModule.set_gradient_divide_factor = lambda unit, _: original(unit, float(layout.num_replicas))
        assert_same_training(_steps(cfg, layout), native, f"world {world_size}, ep {ep}, {name}")


@pytest.mark.slow
@pytest.mark.parametrize("world_size,ep,variants", [
    (2, 2, ["plain", "grad_accum_2", "global_batch_scope", "no_reshard_full_recompute"]),
    (4, 2, ["plain", "grad_accum_2", "moe_recompute"]),
    (4, 4, ["plain", "global_batch_scope"]),
])
def test_fsdp_trains_like_the_native_engine(world_size, ep, variants):
    run_processes(_parity_worker, world_size, ep, variants, False, timeout_s=300)


@pytest.mark.slow
def test_experts_averaged_over_their_replicas_only_break_parity():
    with pytest.raises(Exception, match="grad norm .* vs"):
        run_processes(_parity_worker, 4, 2, ["plain"], True, timeout_s=300)


# ----------------------------------------------------------------------------- checkpoints, through the CLI

TINY = ["configs/tiny.yaml", "train.steps=4", "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1",
        "run.log_every=1", "run.progress=false", "ckpt.every=2", "train.device=cpu", "parallel.timeout_s=120"]
FSDP = ["train.engine=fsdp", "parallel.ep=1"]  # ep 1 on 2 ranks: the experts sharded over their 2 replicas


def _train_cli(run_dir, *overrides):
    done = run_cli(["train", *TINY, *overrides, f"run.dir={run_dir}"], nproc=2, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def _losses(run_dir) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r}


def _continued_from_step_2(source, target, *overrides):
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step_0000004")
    for name in ("metrics.jsonl",):  # the continued run appends steps 3 and 4 again
        records = [r for r in read_metrics(source) if r.get("step", 0) <= 2]
        (target / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    done = _train_cli(target, *overrides)
    assert "resuming from" in done.stderr and "step 2" in done.stderr
    return _losses(target)


def _close(got, want, steps, what):
    for s in steps:
        assert abs(got[s][0] - want[s][0]) <= 1e-4, f"{what}: step {s} loss {got[s]} vs {want[s]}"
        assert abs(got[s][1] - want[s][1]) <= 1e-5 * want[s][1] + 1e-7, f"{what}: step {s} grad norm"


@pytest.mark.slow
def test_fsdp_checkpoints_resume_exactly_and_cross_engines_and_ep_sizes(tmp_path):
    native, fsdp = tmp_path / "native", tmp_path / "fsdp"
    _train_cli(native)  # world 2, ep 2
    done = _train_cli(fsdp, *FSDP)
    assert "engine fsdp" in done.stderr and '"param_bytes"' in done.stderr
    want, got = _losses(native), _losses(fsdp)
    _close(got, want, [1, 2, 3, 4], "fsdp ep 1 vs native ep 2")

    resumed = _continued_from_step_2(fsdp, tmp_path / "fsdp_resumed", *FSDP)
    assert all(resumed[s] == got[s] for s in (3, 4)), f"fsdp resume is not exact: {resumed} vs {got}"
    _close(_continued_from_step_2(fsdp, tmp_path / "fsdp_then_native"), want, [3, 4], "fsdp -> native ep 2")
    _close(_continued_from_step_2(native, tmp_path / "native_then_fsdp", *FSDP), want, [3, 4], "native -> fsdp ep 1")

    evaluated = run_cli(["eval", str(fsdp)], timeout=120)
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["step"] == 4, evaluated.stderr[-2000:]
    exported = run_cli(["export", str(fsdp), str(tmp_path / "export")], timeout=120)
    assert exported.returncode == 0, exported.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: FSDP's bf16 mixed-precision policy is CUDA-only")
def test_fsdp_bf16_with_recompute_trains_on_cuda(tmp_path):
    done = run_cli(["train", *TINY, "train.engine=fsdp", "train.dtype=bf16", "train.activation_checkpointing=full",
                    "train.device=cuda", "parallel.backend=nccl", "parallel.ep=1", f"run.dir={tmp_path / 'gpu'}"],
                   timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(tmp_path / "gpu") if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("override, named", [
    ("train.reshard_after_forward=false", "train.reshard_after_forward: false needs train.engine=fsdp"),
    ("train.activation_checkpointing=blocks", "train.activation_checkpointing"),
    ("train.engine=fsdpp", "train.engine"),
])
def test_bad_scaling_settings_are_one_line(tmp_path, override, named):
    done = run_cli(["check", "configs/tiny.yaml", "--nproc", "2", override, f"run.dir={tmp_path / 'run'}"], timeout=60)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1 and named in errors[0], done.stderr[-2000:]
