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

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup

from ..moe.collectives import all_reduce_sum_, named_collective
from ..moe.experts import expert_parameters
from .dist import Layout


def split_dense_expert(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated parameters, expert parameters), by the module that holds each one."""
    experts = {id(p) for p in expert_parameters(model)}
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if id(p) in experts else dense).append(p)
    return dense, expert


def grads_or_zeros(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    # a parameter that took no part in the forward still joins the collective, as zeros
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _buckets(params: list[nn.Parameter], is_expert: set[int], max_numel: int) -> list[list[nn.Parameter]]:
    """Consecutive runs of `params` of one kind (dense or expert) and dtype, at most `max_numel`
    elements each (or one tensor)."""
    buckets: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    numel = 0
    for p in params:
        if current and (numel + p.numel() > max_numel or p.dtype != current[0].dtype
                        or (id(p) in is_expert) != (id(current[0]) in is_expert)):
            buckets.append(current)
            current, numel = [], 0
        current.append(p)
        numel += p.numel()
    if current:
        buckets.append(current)
    return buckets


@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    group: Optional[ProcessGroup]
    what: str  # "dense" | "expert"
    ready: int = 0  # parameters whose gradient of this step is final
    flat: Optional[torch.Tensor] = None  # in flight
    work: Optional[dist.Work] = None


class GradSync:
    """Gradient reduction in buckets launched DURING the last micro-batch's backward.

    Each bucket (about `bucket_mb` of gradients, parameters in reverse order of definition,
    the order backward produces them) starts its all_reduce as soon as its last gradient is
    accumulated, so communication overlaps with the rest of the backward. Buckets always start
    in the same fixed order on every rank (a ready bucket waits for the ones before it), so
    ranks issue collectives in one order; a bucket whose parameters got no gradient starts in
    `reduce`, with zeros. Call `expect_backward(last)` before each micro-batch's backward and
    `reduce()` after the last one."""

    def __init__(self, model: nn.Module, layout: Layout, bucket_mb: float = 25.0, overlap: bool = True):
        self.layout = layout
        self.dense, self.expert = split_dense_expert(model)
        self.overlap = overlap and layout.world_size > 1
        max_numel = max(1, int(bucket_mb * 2**20 / 4))
        # dense and expert buckets interleaved in reverse definition order, the order backward
        # finishes them; experts with a single replica have nothing to sum and get no bucket
        is_expert = {id(p) for p in self.expert}
        synced = [p for p in model.parameters() if p.requires_grad and
                  (id(p) not in is_expert or layout.expert_dp_group is not None)]
        self.buckets = [_Bucket(b, layout.expert_dp_group, "expert") if id(b[0]) in is_expert
                        else _Bucket(b, layout.world_group, "dense")
                        for b in _buckets(synced[::-1], is_expert, max_numel)]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._next = 0  # first bucket not yet launched
        self._armed = False
        if self.overlap:
            for bucket in self.buckets:
                for p in bucket.params:
                    p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def expect_backward(self, last_micro_batch: bool) -> None:
        """Launch reductions during the coming backward only if it completes the step's gradients."""
        self._armed = self.overlap and last_micro_batch

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        bucket = self._bucket_of.get(id(p))  # None: a copy of a parameter (deepcopy) or a frozen one
        if not self._armed or bucket is None:
            return
        bucket.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.flat = _flatten_dense_tensors(grads_or_zeros(bucket.params))
        with named_collective("gradient sync", f"all_reduce of {bucket.what} gradients"):
            bucket.work = dist.all_reduce(bucket.flat, group=bucket.group, async_op=True)

    def reduce(self) -> None:
        """Turn each rank's local gradients into the gradient of the global mean loss."""
        self._armed = False
        if self.layout.world_size > 1:
            for bucket in self.buckets[self._next:]:
                self._launch(bucket)
            inv_world = 1.0 / self.layout.world_size
            for bucket in self.buckets:
                with named_collective("gradient sync", f"all_reduce of {bucket.what} gradients"):
                    bucket.work.wait()
                bucket.flat.mul_(inv_world)
                for p, synced in zip(bucket.params, _unflatten_dense_tensors(bucket.flat, bucket.params)):
                    p.grad.copy_(synced)
                bucket.flat, bucket.work, bucket.ready = None, None, 0
        if self.layout.expert_dp_group is None and self.expert:  # one replica of each expert: only the mean
            torch._foreach_mul_(grads_or_zeros(self.expert), 1.0 / self.layout.world_size)
        self._next = 0

    def global_norm(self) -> torch.Tensor:
        """The one-process gradient norm, identical on every rank (call after `reduce`).
        Per-tensor norms in one fused kernel per group, summed in fp64."""
        device = self.layout.device

        def sum_sq(grads: list[torch.Tensor]) -> torch.Tensor:
            if not grads:
                return torch.zeros((), dtype=torch.float64, device=device)
            return torch.stack(torch._foreach_norm(grads)).double().square().sum()

        expert_sq = sum_sq(grads_or_zeros(self.expert))
        all_reduce_sum_(expert_sq, self.layout.ep_group, "gradient clipping", "all_reduce of the expert norm")
        return (sum_sq(grads_or_zeros(self.dense)) + expert_sq).sqrt()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so the global norm is at most `max_norm` (0 = measure only)."""
        norm = self.global_norm()
        if max_norm > 0 and (self.dense or self.expert):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0).to(torch.float32)
            torch._foreach_mul_(grads_or_zeros(self.dense + self.expert), coef)
        return norm.float()
