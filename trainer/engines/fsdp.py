"""torch FSDP2 over our expert-parallel model (`train.engine=fsdp`): parameters, gradients and AdamW
state sharded, dense ones over the world and routed experts over their replicas (`parallel.fsdp`).

Per step: each micro-batch's backward reduce-scatters its gradients into the shards (so no rank ever
holds the whole gradient); `reduce_and_clip` divides the unsharded experts' gradients (one replica
each) by the world and clips by the global norm, one all_reduce of local sums of squares; AdamW then
updates the shards in place. `train.reshard_after_forward=false` keeps each block's gathered weights
from its forward to its backward (ZeRO-2-like: more memory, one all_gather fewer per block).

Checkpoints hold the same entries as the native engine's: DCP writes each sharded dense tensor as
one logical tensor, and each rank writes the experts in its shards under their global ids, so
either engine resumes the other at any world and EP size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import Config
from ..moe.collectives import all_reduce_sum_
from ..parallel.dist import Layout, join_world_alone, resolve_backend
from ..parallel.fsdp import local_tensor, mixed_precision, shard_model
from ..parallel.grad_sync import GradSync, grads_or_zeros
from . import adamw, adamw_param_groups
from .native import NativeEngine


class FSDPEngine(NativeEngine):
    """The native engine's update and optimizer state, on FSDP's shards: its own backward and clipping."""

    name = "fsdp"

    def __init__(self, cfg: Config, model: nn.Module, layout: Layout):  # not NativeEngine's: no GradSync hooks
        self.model, self.layout = model, layout
        self.world_group = layout.world_group or join_world_alone(resolve_backend(cfg.parallel, layout.device))
        self.unsharded_experts = shard_model(model, layout, self.world_group, cfg.train.reshard_after_forward,
                                             mixed_precision(cfg.train.dtype, layout.device))
        # which parameters are experts (for the loop's counts); it reduces nothing here
        self.grad_sync = GradSync(model, layout, overlap=False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(adamw_param_groups(model, cfg), cfg)

    def backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        (loss / micro_batches).backward()  # FSDP reduce-scatters each unit's gradients as backward leaves it

    def reduce_and_clip(self, max_norm: float) -> Optional[torch.Tensor]:
        if self.unsharded_experts:
            torch._foreach_mul_(grads_or_zeros(self.unsharded_experts), 1.0 / self.layout.world_size)
        grads = [local_tensor(g) for g in grads_or_zeros(self.params)]  # this rank's shards
        # every element of every gradient lives in exactly one rank's shard: sum the squares over the world
        sum_sq = torch.stack(torch._foreach_norm(grads)).double().square().sum() if grads else torch.zeros(
            (), dtype=torch.float64, device=self.layout.device)
        all_reduce_sum_(sum_sq, self.layout.world_group, "gradient clipping", "all_reduce of the gradient norm")
        norm = sum_sq.sqrt()
        if max_norm > 0 and grads:
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(torch.float32))
        return norm.float()
