"""The MoE feed-forward layer: router -> dispatcher -> local experts -> combine.

Shape legend: T tokens on this rank, D model dim, K top-k, E experts (global),
X rows for this rank's local experts.

Built without process groups, the layer holds every expert. `apply_expert_parallel` then
keeps this rank's share of the experts and hands the layer its groups: the trainer does
this from `trainer.parallel.parallelize`, after building the model on the meta device. The layer
performs the one reduction of routing statistics over its stats group.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup

from . import recompute
from .collectives import all_reduce_sum_, group_rank, group_size
from .dispatch import Dispatcher
from .experts import Experts, SharedExperts, default_init_std
from .router import Router, Routing, RoutingCounts, balance_losses


@dataclass
class MoEStats:
    """Routing statistics of one forward, summed over the stats group (detached)."""

    routed_E: torch.Tensor  # routes per expert before capacity drops
    dropped: torch.Tensor  # routes dropped by capacity
    routes: torch.Tensor  # valid tokens * top_k
    entropy_sum: torch.Tensor  # router entropy summed over THIS rank's valid tokens (not reduced: the
    #                            trainer adds it to the all_reduce it already makes each step)
    valid_tokens: torch.Tensor  # valid tokens, summed over the stats group


@dataclass
class MoEOutput:
    out: torch.Tensor  # same shape as the input
    aux_loss: torch.Tensor  # fp32 scalar, load-balancing loss (E * sum_i f_i * P_i), coefficient NOT applied
    z_loss: torch.Tensor  # fp32 scalar, mean(logsumexp(logits)^2), coefficient NOT applied
    stats: MoEStats


class MoE(nn.Module):
    """A drop-in Mixture-of-Experts FFN with SwiGLU experts and optional expert parallelism.

    Args:
        d_model: model (input and output) dimension D.
        d_ff: hidden dimension of each expert.
        num_experts: total experts E over the whole EP group.
        top_k: experts per token; k=1 keeps the raw router probability, k>1 renormalises over the k.
        capacity_factor: None for dropless; else each expert takes at most ceil(cf * T * k / E)
            routes of this rank's T valid tokens, the rest are dropped (their output is zero, so
            the caller's residual carries the token).
        ep_group: process group the experts are sharded over (E must divide by its size); rank r
            of the group owns experts [r*E/P, (r+1)*E/P). None = all experts local.
        stats_group: group over which balance statistics are summed so that the aux loss is the
            global-batch one; use every data-parallel rank. Defaults to `ep_group`.
        layer_id: seeds the initialisation (with `init_weights(seed)`) and names the layer in errors.
        normalize_top_k, drop_policy ("position" | "probs"), score_func ("softmax" | "sigmoid"),
            route_scale, expert_bias (aux-loss-free balancing), aux_loss_scope ("micro_batch" |
            "global_batch" | "sequence"), router_jitter and noisy_topk (training noise, keyed by
            the token's place in the step's global batch; with expert_bias, global_batch or noise
            call `router.finish_step(applied, bias_rate)` once per optimizer step), eval_capacity_factor (capacity in eval mode; None =
            dropless), min_capacity, max_recv_factor (dropless: fail, naming the layer and EP rank,
            when a rank's experts would receive more than this many times the balanced load),
            num_shared_experts (always-on SwiGLU experts beside the routed ones, dense; with
            overlap_shared_experts they are computed while the tokens' all_to_all is in flight), n_groups and
            topk_groups (group-limited routing: each token's experts come from its topk_groups best
            of n_groups contiguous expert groups), expert_impl ("auto" | "loop" | "grouped_mm"), debug_splits:
            see the router, experts and dispatcher.

    forward(x, valid=None) takes x of shape [..., D] and an optional bool mask of shape [...]
    (False = padding: no capacity, no statistics, zero output) and returns `MoEOutput`.
    Every rank of `ep_group` must call forward the same number of times (it is a collective).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: Optional[float] = None,
        ep_group: Optional[ProcessGroup] = None,
        stats_group: Optional[ProcessGroup] = None,
        layer_id: int = 0,
        normalize_top_k: Optional[bool] = None,
        drop_policy: str = "position",
        expert_impl: str = "auto",
        debug_splits: bool = False,
        score_func: str = "softmax",
        route_scale: float = 1.0,
        expert_bias: bool = False,
        eval_capacity_factor: Optional[float] = None,
        min_capacity: int = 0,
        max_recv_factor: Optional[float] = None,
        num_shared_experts: int = 0,
        n_groups: int = 1,
        topk_groups: int = 1,
        aux_loss_scope: str = "micro_batch",
        router_jitter: float = 0.0,
        noisy_topk: bool = False,
        overlap_shared_experts: bool = True,
    ):
        super().__init__()
        self.layer_id = layer_id
        self.where = f"moe layer {layer_id}"
        self.router = Router(d_model, num_experts, top_k, capacity_factor, normalize_top_k, drop_policy,
                             score_func=score_func, route_scale=route_scale, expert_bias=expert_bias,
                             eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                             n_groups=n_groups, topk_groups=topk_groups, aux_loss_scope=aux_loss_scope,
                             router_jitter=router_jitter, noisy_topk=noisy_topk)
        self.experts = Experts(num_experts, d_model, d_ff, 0, expert_impl)
        self.shared_experts = SharedExperts(num_shared_experts, d_model, d_ff) if num_shared_experts > 0 else None
        self.max_recv_factor = max_recv_factor
        self.overlap_shared_experts = overlap_shared_experts
        self.dispatcher = Dispatcher(num_experts, None, self.where, debug_splits)
        self.stats_group: Optional[ProcessGroup] = None
        if ep_group is not None or stats_group is not None:
            self.apply_expert_parallel(ep_group, stats_group, debug_splits)

    def apply_expert_parallel(self, ep_group: Optional[ProcessGroup], stats_group: Optional[ProcessGroup] = None,
                              debug_splits: Optional[bool] = None) -> None:
        """Keep only this rank's experts of `ep_group` and sum balance statistics over `stats_group`.

        Call once, on a layer that still holds every expert (on the meta device, or materialised:
        then the kept experts keep their values). `stats_group` defaults to `ep_group`.
        """
        if self.experts.num_local_experts != self.router.num_experts:
            raise RuntimeError(f"{self.where}: expert parallelism was already applied")
        debug = self.dispatcher.debug_splits if debug_splits is None else debug_splits
        self.dispatcher = Dispatcher(self.router.num_experts, ep_group, self.where, debug, self.max_recv_factor)
        num_local = self.dispatcher.num_local_experts
        first = group_rank(self.dispatcher.ep_group) * num_local
        self.experts = self.experts.local_slice(first, num_local)
        self.stats_group = stats_group if stats_group is not None else ep_group

    def __deepcopy__(self, memo: dict) -> "MoE":
        """A copy shares the layer's process groups (handles to communicators, which cannot be
        copied) and copies everything else: a deepcopy of a sharded model is a sharded model."""
        for group in (self.dispatcher.ep_group, self.stats_group):
            if group is not None:
                memo[id(group)] = group
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__dict__, memo))
        return clone

    @property
    def ep_size(self) -> int:
        return group_size(self.dispatcher.ep_group)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None,
                token_offset: Optional[int] = None) -> MoEOutput:
        """`token_offset`: index of x's first token in the optimizer step's global batch, for the
        training noise; by default (micro-batch call * ranks + rank) * tokens, i.e. micro-batch-major.

        Under activation checkpointing the forward records its routing decision and the recompute
        replays it (`trainer.moe.recompute`): no second noise draw, count or count exchange."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        valid_T = None if valid is None else valid.reshape(-1)
        seq_len = shape[-2] if len(shape) >= 3 else None
        decision = recompute.replayed(self, self.where)
        routing, counts, aux_loss, z_loss = self.route(x_TD, valid_T, seq_len, token_offset, decision)
        if torch.is_autocast_enabled(x.device.type):  # send half-width rows, experts run in it anyway
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        if decision is None:
            plan = self.plan_dispatch(routing, counts, x_TD)
            recompute.record(self, recompute.RoutingDecision(
                routing.expert_idx_TK, routing.keep_TK, counts.all, routing.token_offset, plan))
        else:
            plan = decision.plan_with_weights(routing.weight_TK)
        shared_TD = None
        if self.shared_experts is not None and self.overlap_shared_experts:
            started = self.dispatcher.start_send(x_TD, plan)
            shared_TD = self.shared_experts(x_TD)  # while the rows travel (and, in backward, their gradients)
            x_XD = self.dispatcher.finish_send(started, plan)
        else:
            x_XD = self.dispatcher.send(x_TD, plan)
        y_XD = self.experts(x_XD, plan.tokens_per_local_expert, plan.row_blocks)
        out_TD = self.dispatcher.combine(y_XD, plan)
        if self.shared_experts is not None:  # every valid token, no routing; padding still gets zero
            shared_TD = (self.shared_experts(x_TD) if shared_TD is None else shared_TD).float()
            out_TD = out_TD + (shared_TD if valid_T is None else shared_TD * valid_T[:, None])
        return MoEOutput(
            out=out_TD.to(x.dtype).view(shape),
            aux_loss=aux_loss,
            z_loss=z_loss,
            stats=MoEStats(counts.routed_E, counts.dropped, counts.valid_tokens * self.router.top_k,
                           routing.entropy_sum, counts.valid_tokens),
        )

    def route(self, x_TD: torch.Tensor, valid_T: Optional[torch.Tensor] = None, seq_len: Optional[int] = None,
              token_offset: Optional[int] = None, decision: Optional[recompute.RoutingDecision] = None,
              ) -> tuple[Routing, RoutingCounts, torch.Tensor, torch.Tensor]:
        """The first stage of `forward`: routing, the layer's one reduction of routing statistics,
        and the balance losses (aux, z). Also used by `trainer.tools.stage_timing`. With a recorded
        `decision` (a recompute), the choices, counts and noise key are the recorded ones."""
        if decision is not None:
            offset = decision.token_offset
        else:
            offset = token_offset or 0
            if self.router.noisy and self.training:
                if token_offset is None:
                    T = x_TD.shape[0]
                    offset = (self.router.noise_calls * group_size(self.stats_group) + group_rank(self.stats_group)) * T
                self.router.noise_calls += 1
        chosen = None if decision is None else (decision.expert_idx_TK, decision.keep_TK)
        routing = self.router(x_TD, valid_T, seq_len=seq_len, token_offset=offset, chosen=chosen)
        if decision is None:  # the layer's one reduction: routing counts over every rank the sync averages
            global_counts = all_reduce_sum_(routing.local_counts, self.stats_group, self.where,
                                            "all_reduce of routing statistics")
        else:
            global_counts = decision.global_counts
        counts = RoutingCounts.split(global_counts)
        aux_loss, z_loss = balance_losses(routing, counts, group_size(self.stats_group), self.router.top_k,
                                          self.router.aux_loss_scope, self.router.prev_counts_E)
        # only training forwards count, and a recompute's routes were counted by its forward
        if decision is None and self.router.counts_steps and self.training and torch.is_grad_enabled():
            self.router.count_step(counts.routed_E)
        return routing, counts, aux_loss, z_loss

    def plan_dispatch(self, routing: Routing, counts: RoutingCounts, x_TD: torch.Tensor):
        """The dispatcher's plan for these routes: rows grouped by expert for grouped GEMM; for the
        expert loop, left in the blocks the all_to_all delivers unless those are small."""
        expert_major = None if self.experts.takes_row_blocks(x_TD.device, x_TD.dtype) else True
        return self.dispatcher.plan(routing, *self.dispatch_limits(counts), expert_major=expert_major)

    def dispatch_limits(self, counts: RoutingCounts) -> tuple[Optional[torch.Tensor], str]:
        """The dispatcher's (global routes per expert, phase): the loads a dropless layer checks
        against `max_recv_factor` (None under a capacity), and which phase an error names."""
        dropless = self.router.active_capacity_factor is None
        return (counts.routed_E if dropless else None), ("training" if self.training else "evaluation")

    def init_weights(self, seed: int, std: Optional[float] = None, out_std: Optional[float] = None) -> None:
        """Layout-independent init: router and each global expert from seeds of (seed, layer_id, ...)."""
        d_model = self.router.weight.shape[1]
        default_std, default_out = default_init_std(d_model, 1)
        std = default_std if std is None else std
        out_std = default_out if out_std is None else out_std
        self.router.init_weights(seed, self.layer_id, std)
        self.experts.init_weights(seed, self.layer_id, std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(seed, self.layer_id, std, out_std)
