"""The FSDP2 engine (train.engine=fsdp) trains exactly like the native one, on real gloo processes.

Parity, fp32 and dropless, per-step loss and gradient norm to 1e-5, at (world 2, ep 2), (world 4,
ep 2: experts with replicas, sharded over them) and (world 4, ep 4: one replica, experts unsharded),
with gradient accumulation and with the `global_batch` balance scope, resharding after forward or
not, and with activation checkpointing; after the steps every parameter agrees too. A planted fault
(expert gradients averaged over their replica group only, the factor-of-ep bug) must break parity.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from trainer.build import build_trainer
from trainer.parallel.dist import make_layout
from trainer.train import train_step

from .distributed import run_processes
from .test_training_invariants import CPU, small_config

STEPS = 3
TOLERANCE = 1e-5


def _steps(cfg, layout, seed: int = 0):
    """Per-step (losses, grad_norm) and the full parameters afterwards, for this rank's rows."""
    tr = build_trainer(cfg, layout)
    gen = torch.Generator().manual_seed(seed)
    per_rank = cfg.train.batch_size // layout.world_size
    history = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 256, (cfg.train.batch_size, cfg.model.seq_len + 1), generator=gen)
        mine = tokens[layout.rank * per_rank:(layout.rank + 1) * per_rank]
        result = train_step(tr, mine[:, :-1], mine[:, 1:], 3e-3)
        history.append((result.losses, result.grad_norm))
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
    (4, 2, ["plain", "grad_accum_2"]),
    (4, 4, ["plain", "global_batch_scope"]),
])
def test_fsdp_trains_like_the_native_engine(world_size, ep, variants):
    run_processes(_parity_worker, world_size, ep, variants, False, timeout_s=300)


@pytest.mark.slow
def test_experts_averaged_over_their_replicas_only_break_parity():
    with pytest.raises(Exception, match="grad norm .* vs"):
        run_processes(_parity_worker, 4, 2, ["plain"], True, timeout_s=300)
