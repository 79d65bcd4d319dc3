"""DeepSpeed's engine with ZeRO stage 0, 1 or 2 over our expert-parallel model (`train.engine=deepspeed`).

Ours: the model and its EP groups, the data, the learning-rate schedule, checkpoints. DeepSpeed's:
gradient reduction, ZeRO partitioning of optimizer state (stage 1) and of gradients (stage 2), the
update. Our `GradSync` reduces nothing here, so nothing is reduced twice.

Experts are declared the way DeepSpeed's own MoE layer declares them (`param.allreduce = False`,
`param.group_name`), the optimizer gets DeepSpeed's MoE parameter groups, and our EP and
expert-data-parallel groups are registered under that group name. DeepSpeed then sums expert
gradients over the expert replicas only and divides by the data-parallel world: `grad_sync`'s
semantics, never an average of different experts over the world.

Gradient norm: ZeRO 1/2 sums each rank's partition over the world, which is the global norm; stage 0's
`clip_grad_norm_` averages per-rank norms (wrong under EP, DeepSpeed #8475), so there our norm clips.
Checkpoints are the trainer's own (per-parameter AdamW state, experts under global ids), gathered from
and scattered back into ZeRO's partitions, so either engine resumes the other at any EP size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import Config
from ..moe.collectives import named_collective
from ..parallel.dist import Layout, ep_group_ranks, join_world_alone, new_groups, replica_group_ranks
from ..parallel.grad_sync import GradSync
from ..run.preflight import deepspeed_user_config
from . import ADAM_MOMENTS, NonFiniteError, adamw, adamw_param_groups, set_lr, zeroed_adamw_state


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The JSON config handed to `deepspeed.initialize`: the user's file plus the keys the trainer owns."""
    t = cfg.train
    values = deepspeed_user_config(t.deepspeed_config)
    values.update({
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // world_size // t.grad_accum,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip if t.zero_stage > 0 else 0.0,  # stage 0: ours clips (see the docstring)
        "zero_optimization": {**values.get("zero_optimization", {}), "stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # the trainer's torch AdamW
    })
    values.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs steps
    return values


def _register_groups(layout: Layout, timeout_s: float) -> str:
    """Hand DeepSpeed our EP and expert-data-parallel groups (groups of one where ours are None), and
    a copy of the world group with our timeout: DeepSpeed's own copy, which its ZeRO reductions use,
    would get torch's default and turn a dead peer into a 30-minute hang."""
    from deepspeed.utils import groups as ds_groups

    world, ep, rank = max(layout.world_size, 1), layout.ep, max(layout.rank, 0)
    ep_ranks, replica_ranks = ep_group_ranks(world, ep), replica_group_ranks(world, ep)
    ep_group = layout.ep_group or new_groups(ep_ranks, rank, timeout_s)
    replica_group = layout.expert_dp_group or new_groups(replica_ranks, rank, timeout_s)
    ds_groups._WORLD_GROUP = new_groups([list(range(world))], rank, timeout_s)
    name = f"ep_size_{ep}"
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = next(r for r in ep_ranks if rank in r)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = replica_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = next(r for r in replica_ranks if rank in r)
    return name


@contextlib.contextmanager
def _moe_aware_initialize(deepspeed, has_experts: bool):
    """`deepspeed.initialize`, building an engine that knows the model has MoE layers.

    DeepSpeed recognises only its own MoE class; without `has_moe_layers` its ZeRO optimizer builds
    no expert partitions and averages expert gradients over the world like dense ones."""
    original = deepspeed.DeepSpeedEngine

    class MoEAwareEngine(original):
        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            self.has_moe_layers = has_experts

    deepspeed.DeepSpeedEngine = MoEAwareEngine
    try:
        yield deepspeed.initialize
    finally:
        deepspeed.DeepSpeedEngine = original


class _FullState:
    """Per-parameter AdamW state gathered from ZeRO's partitions (what `checkpoint.optimizer_entries` reads and fills)."""

    def __init__(self):
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}


class DeepSpeedZero:
    name = "deepspeed"

    def __init__(self, cfg: Config, model: nn.Module, layout: Layout):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if layout.device.type == "cuda" else "cpu")
        # DeepSpeed's CPU comm op is compiled per environment (setup.sh does it once): keep it with this
        # venv, not in the per-user cache where two checkouts would keep rebuilding each other's
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed 0.19 calls a torch collective that torch 2.13 deprecates, on every rank at every save
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
        join_world_alone("gloo")
        self.model, self.stage = model, cfg.train.zero_stage
        self.grad_sync = GradSync(model, layout, overlap=False)  # which parameters are experts; stage 0's norm
        group_name = _register_groups(layout, cfg.parallel.timeout_s)
        for p in self.grad_sync.expert:
            p.allreduce, p.group_name = False, group_name
        param_groups = adamw_param_groups(model, cfg)
        if self.grad_sync.expert:
            # our "experts" group moves whole into DeepSpeed's group for its EP groups (keeping its
            # lr_scale) and leaves an empty group behind, which ZeRO must not see
            param_groups = [g for g in split_params_into_different_moe_groups_for_optimizer(param_groups)
                            if g["params"]]
        self.adamw = adamw(param_groups, cfg)
        with _moe_aware_initialize(deepspeed, bool(self.grad_sync.expert)) as initialize:
            self.ds, self.zero, _, _ = initialize(model=model, optimizer=self.adamw,
                                                  config=deepspeed_config(cfg, max(layout.world_size, 1)))

    def forward(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        with named_collective("gradient sync", "DeepSpeed backward (gradient reduction)"):
            self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            if not last:
                self.ds.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def reduce_and_clip(self, max_norm: float) -> Optional[torch.Tensor]:
        if self.stage == 0:  # DeepSpeed all_reduced the gradients during the last backward
            return self.grad_sync.clip_(max_norm)
        return None  # ZeRO 1/2 measures and clips inside step()

    def step(self, lr: float, norm: Optional[float], loss_is_finite: bool) -> float:
        set_lr(self.adamw, lr)
        if not loss_is_finite or (norm is not None and not math.isfinite(norm)):
            return float("nan") if norm is None else norm  # not applied; the run stops (skip_nonfinite is 0)
        with named_collective("optimizer step", "DeepSpeed step (ZeRO norm, update, gather)"):
            self.ds.step()
        if norm is None:
            norm = float(self.ds.get_global_grad_norm())
            if not math.isfinite(norm):
                raise NonFiniteError(f"non-finite gradient norm ({norm}) in DeepSpeed's step; the run stopped "
                                     "and the last checkpoint is intact")
        return norm

    # ------------------------------------------------------------------ checkpoints

    def _adam_step(self) -> Optional[torch.Tensor]:
        steps = [s["step"] for s in self.adamw.state.values() if "step" in s]
        return steps[0] if steps else None

    def _link_optimizer_state(self) -> None:
        """Point each parameter's ZeRO fragment at its slice of AdamW's state. DeepSpeed links once,
        right after the FIRST parameter group's first step, when the other groups have no state yet,
        so their fragments stay empty; linking again is cheap (views)."""
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()

    def optimizer_state(self, for_loading: bool = False):
        if self.stage == 0:  # per-parameter state already
            if for_loading:
                zeroed_adamw_state(self.adamw.state, self.model.parameters())
            return self.adamw
        from deepspeed.utils import safe_get_full_optimizer_state

        view = _FullState()
        if for_loading:
            zeroed_adamw_state(view.state, self.model.parameters())  # a checkpoint loads into it; `loaded` hands it on
            return view
        step = self._adam_step()
        if step is None:
            return view  # no step yet: no state to save
        self._link_optimizer_state()
        for p in self.model.parameters():  # collective over each parameter's ZeRO partition group
            view.state[p] = {"step": step.detach().clone(),
                             # on the host: the full state of every parameter at once would undo ZeRO's
                             # device-memory saving (it still costs host memory, see the README)
                             **{m: safe_get_full_optimizer_state(p, m).detach().cpu()
                                for m in ADAM_MOMENTS}}
        return view

    def loaded(self, state) -> None:
        """After a checkpoint was loaded into the model (and `state`, or None: weights only): refresh ZeRO's copies."""
        if self.stage == 0:
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        self.zero.refresh_fp32_params()  # its fp32 partitions follow the weights just loaded
        if state is None or not state.state:
            return
        step = next(iter(state.state.values()))["step"]
        for flat in self.zero.single_partition_of_fp32_groups:  # AdamW state exists only after a first step
            self.adamw.state[flat] = {"step": step.detach().clone().float(),
                                      **{m: torch.zeros_like(flat) for m in ADAM_MOMENTS}}
        self._link_optimizer_state()
        for p, values in state.state.items():
            for moment in ADAM_MOMENTS:
                safe_set_full_optimizer_state(p, values[moment], moment)
