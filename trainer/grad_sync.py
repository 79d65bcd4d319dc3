"""Gradient reduction and global-norm clipping for dense and expert parameters.

Each rank's loss is the mean over its own tokens, and the global loss is the mean of the W
ranks' losses. So, for the gradient of the global loss:
  * dense (replicated) parameters: SUM over all W ranks, divide by W (a mean);
  * expert parameters: the all_to_all backward already SUMMED the contributions of every
    rank of the EP group into the owner's gradient; SUM over the expert-data-parallel
    replicas (which now covers all W ranks once) and divide by W, NOT by the EDP size.
    Dividing by the EDP size instead leaves expert gradients `ep` times too large, the
    bug that shipped in DeepSpeed, torchtitan and Tutel.

Clipping: norm^2 = (dense, identical on every rank, counted once)
                 + SUM over the EP group of (local experts), which counts each expert once.

Expert parameters are those held by `Experts` modules (module membership), so a deepcopy or
a meta-device build cannot turn an expert into a "dense" parameter averaged with other experts.
Every collective here raises `CollectiveError` naming the operation; the loop adds the step.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup

from .dist import Layout
from .moe.collectives import all_reduce_sum_
from .moe.experts import expert_parameters


def split_dense_expert(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated parameters, expert parameters), by the module that holds each one."""
    experts = {id(p) for p in expert_parameters(model)}
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if id(p) in experts else dense).append(p)
    return dense, expert


def _grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    # a parameter that took no part in the forward still joins the collective, as zeros
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _buckets(tensors: list[torch.Tensor], max_numel: int) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    numel = 0
    for t in tensors:
        if current and (numel + t.numel() > max_numel or t.dtype != current[0].dtype):
            buckets.append(current)
            current, numel = [], 0
        current.append(t)
        numel += t.numel()
    if current:
        buckets.append(current)
    return buckets


def sum_and_scale_(grads: list[torch.Tensor], group: Optional[ProcessGroup], scale: float, what: str,
                   bucket_numel: int = 1 << 24) -> None:
    """grads <- scale * SUM_group(grads), in flat buckets to keep collectives few."""
    for bucket in _buckets(grads, bucket_numel):
        flat = _flatten_dense_tensors(bucket)
        all_reduce_sum_(flat, group, "gradient sync", f"all_reduce of {what} gradients")
        flat.mul_(scale)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


class GradSync:
    def __init__(self, model: nn.Module, layout: Layout):
        self.layout = layout
        self.dense, self.expert = split_dense_expert(model)

    def reduce(self) -> None:
        """Turn each rank's local gradients into the gradient of the global mean loss."""
        inv_world = 1.0 / self.layout.world_size
        sum_and_scale_(_grads(self.dense), self.layout.world_group, inv_world, "dense")
        sum_and_scale_(_grads(self.expert), self.layout.expert_dp_group, inv_world, "expert")

    def global_norm(self) -> torch.Tensor:
        """The one-process gradient norm, identical on every rank (call after `reduce`)."""
        device = self.layout.device
        dense_sq = torch.zeros((), dtype=torch.float64, device=device)
        for g in _grads(self.dense):
            dense_sq += g.double().square().sum()
        expert_sq = torch.zeros((), dtype=torch.float64, device=device)
        for g in _grads(self.expert):
            expert_sq += g.double().square().sum()
        all_reduce_sum_(expert_sq, self.layout.ep_group, "gradient clipping", "all_reduce of the expert norm")
        return (dense_sq + expert_sq).sqrt()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so the global norm is at most `max_norm` (0 = measure only)."""
        norm = self.global_norm()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0).to(torch.float32)
            for g in _grads(self.dense + self.expert):
                g.mul_(coef.to(g.dtype))
        return norm.float()
