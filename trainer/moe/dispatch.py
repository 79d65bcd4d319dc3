"""Moves routed tokens to the ranks that own their experts and brings the results back.

Shape legend: T tokens on this rank, D model dim, K top-k, E experts (global),
P ranks in the EP group, L = E/P local experts, R routes this rank sends (kept routes,
sorted by expert), X rows this rank's experts process.

dispatch:  preprocess (sort routes by expert, gather rows)
           -> comm (exchange counts, then uneven all_to_all of rows)
           -> postprocess (regroup rows from rank-major to local-expert-major)
combine:   the same stages in reverse, then a weighted scatter-add into [T, D].

Receive splits always come from the all_to_all of counts, never from a guess. With
`debug_splits`, every rank also all-gathers the whole split matrix and checks it, because
gloo fills mismatched splits with garbage instead of failing. Nothing is kept on `self`
between stages: `dispatch` returns a `DispatchPlan` that `combine` takes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed import ProcessGroup

from .collectives import CollectiveError, all_gather_tensor, all_to_all_counts, all_to_all_rows, group_rank, group_size
from .router import Routing


@dataclass
class DispatchPlan:
    num_tokens: int
    token_idx_R: torch.Tensor  # source token of each sent route
    weight_R: torch.Tensor  # fp32 combine weight of each sent route
    send_splits: list[int]  # rows sent to each rank of the EP group
    recv_splits: list[int]  # rows received from each rank of the EP group
    tokens_per_local_expert: list[int]
    expert_major_idx_X: Optional[torch.Tensor]  # rank-major received row of each expert-major row


def regroup_index(counts_PL: torch.Tensor) -> torch.Tensor:
    """Row order that turns (source rank, local expert) blocks into (local expert, source rank) blocks."""
    P, L = counts_PL.shape
    flat = counts_PL.reshape(-1)
    starts_PL = (torch.cumsum(flat, 0) - flat).view(P, L)
    lengths_LP, starts_LP = counts_PL.t().reshape(-1), starts_PL.t().reshape(-1)
    total = int(lengths_LP.sum())
    block_start_X = torch.repeat_interleave(starts_LP, lengths_LP, output_size=total)
    block_begin_X = torch.repeat_interleave(torch.cumsum(lengths_LP, 0) - lengths_LP, lengths_LP, output_size=total)
    return block_start_X + torch.arange(total, device=counts_PL.device) - block_begin_X


class LoadError(RuntimeError):
    """An EP rank would receive more rows than `max_recv_factor` allows; the same on every rank."""


class Dispatcher:
    def __init__(self, num_experts: int, ep_group: Optional[ProcessGroup] = None, where: str = "moe",
                 debug_splits: bool = False, max_recv_factor: Optional[float] = None):
        self.num_experts = num_experts
        self.ep_group = ep_group if group_size(ep_group) > 1 else None
        self.ep_size = group_size(self.ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"{where}: num_experts={num_experts} is not divisible by the EP group size {self.ep_size}")
        self.num_local_experts = num_experts // self.ep_size
        self.where, self.debug_splits, self.max_recv_factor = where, debug_splits, max_recv_factor

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, global_routed_E: Optional[torch.Tensor] = None,
                 phase: str = "training") -> tuple[torch.Tensor, DispatchPlan]:
        """`global_routed_E` (routes per expert summed over every data-parallel rank, the same on
        all of them) lets a dropless layer refuse a load over `max_recv_factor` before moving rows."""
        x_RD, token_idx_R, weight_R, counts_E = self._dispatch_preprocess(x_TD, routing)
        limit_E = global_routed_E if self.max_recv_factor is not None else None
        x_recv, send_splits, recv_splits, recv_counts_PL = self._dispatch_comm(x_RD, counts_E, limit_E, phase)
        tokens_per_local_expert = recv_counts_PL.sum(0).tolist()
        expert_major_idx_X = None
        if self.ep_size > 1 and self.num_local_experts > 1:
            expert_major_idx_X = regroup_index(recv_counts_PL.to(x_TD.device))
            x_recv = x_recv[expert_major_idx_X]
        plan = DispatchPlan(x_TD.shape[0], token_idx_R, weight_R, send_splits, recv_splits,
                            tokens_per_local_expert, expert_major_idx_X)
        return x_recv, plan

    def _dispatch_preprocess(self, x_TD: torch.Tensor, routing: Routing):
        K = routing.expert_idx_TK.shape[1]
        kept_routes = routing.keep_TK.reshape(-1).nonzero().squeeze(1)
        expert_R = routing.expert_idx_TK.reshape(-1)[kept_routes]
        by_expert = torch.argsort(expert_R, stable=True)
        kept_routes, expert_R = kept_routes[by_expert], expert_R[by_expert]
        token_idx_R = kept_routes // K
        weight_R = routing.weight_TK.reshape(-1)[kept_routes]
        counts_E = torch.bincount(expert_R, minlength=self.num_experts)
        return x_TD[token_idx_R], token_idx_R, weight_R, counts_E

    def _dispatch_comm(self, x_RD: torch.Tensor, counts_E: torch.Tensor, global_routed_E: Optional[torch.Tensor],
                       phase: str = "training"):
        P, L = self.ep_size, self.num_local_experts
        send_counts_PL = counts_E.view(P, L)
        if P == 1:
            splits = [x_RD.shape[0]]
            return x_RD, splits, splits, send_counts_PL.cpu()
        if self.debug_splits:  # before the count exchange, which mismatched shapes would corrupt
            self._check_layer_shapes(send_counts_PL.device)
        recv_counts_PL = all_to_all_counts(send_counts_PL, self.ep_group, self.where)
        if self.debug_splits:
            self._check_split_matrix(send_counts_PL, recv_counts_PL)
        # one device-to-host copy per layer for both split lists (and the global loads, if checked)
        parts = [send_counts_PL.sum(1), recv_counts_PL.reshape(-1)]
        if global_routed_E is not None:
            parts.append(global_routed_E.to(send_counts_PL.dtype))
        host = torch.cat(parts).cpu()
        send_splits, recv_counts_PL = host[:P].tolist(), host[P:P + P * L].view(P, L)
        recv_splits = recv_counts_PL.sum(1).tolist()
        if global_routed_E is not None:
            self._check_load(host[P + P * L:].view(P, L).sum(1), phase)
        x_recv = all_to_all_rows(x_RD, send_splits, recv_splits, self.ep_group, self.where)
        return x_recv, send_splits, recv_splits, recv_counts_PL

    def _check_load(self, load_P: torch.Tensor, phase: str) -> None:
        """Refuse, on every rank alike (the loads are global), a receive buffer over the limit."""
        balanced = load_P.sum().item() / self.ep_size
        worst = int(load_P.argmax())
        ratio = load_P[worst].item() / max(balanced, 1e-9)
        if ratio > self.max_recv_factor:
            capacity_key = "moe.capacity_factor" if phase == "training" else "moe.eval_capacity_factor"
            raise LoadError(f"{self.where}: in {phase}, EP rank {worst} would receive {ratio:.2f}x the balanced "
                            f"load ({int(load_P[worst])} of {int(load_P.sum())} routes over all data-parallel "
                            f"ranks, moe.max_recv_factor={self.max_recv_factor}); raise it, set {capacity_key}, "
                            "or balance the router")

    def _check_layer_shapes(self, device: torch.device) -> None:
        header = torch.tensor([self.num_experts, self.ep_size], device=device)
        headers = all_gather_tensor(header, self.ep_group, self.where, "all_gather of layer shapes")
        if not bool((headers == header).all()):
            raise CollectiveError(f"{self.where}: ranks of the EP group disagree on (num_experts, ep size): "
                                  f"{headers.tolist()} by EP rank")

    def _check_split_matrix(self, send_counts_PL: torch.Tensor, recv_counts_PL: torch.Tensor) -> None:
        """Every rank sees the full [src, dst, local expert] matrix and checks its own column."""
        matrix_PPL = all_gather_tensor(send_counts_PL, self.ep_group, self.where, "all_gather of split matrix")
        me = group_rank(self.ep_group)
        expected_PL = matrix_PPL[:, me, :]
        if not torch.equal(expected_PL, recv_counts_PL):
            bad = (expected_PL != recv_counts_PL).any(1).nonzero().squeeze(1).tolist()
            raise CollectiveError(f"{self.where}: EP rank {me} received counts {recv_counts_PL.tolist()} but the "
                                  f"senders report {expected_PL.tolist()} (mismatch from EP ranks {bad})")

    # ------------------------------------------------------------------ combine

    def combine(self, y_XD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        y_back_RD = self._combine_comm(self._combine_preprocess(y_XD, plan), plan)
        return self._combine_postprocess(y_back_RD, plan)

    def _combine_preprocess(self, y_XD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if plan.expert_major_idx_X is None:
            return y_XD
        rank_major_idx_X = torch.empty_like(plan.expert_major_idx_X)
        rank_major_idx_X[plan.expert_major_idx_X] = torch.arange(y_XD.shape[0], device=y_XD.device)
        return y_XD[rank_major_idx_X]

    def _combine_comm(self, y_XD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if self.ep_size == 1:
            return y_XD
        return all_to_all_rows(y_XD, plan.recv_splits, plan.send_splits, self.ep_group, self.where)

    def _combine_postprocess(self, y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # weighted in fp32; dropped routes add nothing, the residual stream carries their token
        weighted_RD = y_RD.float() * plan.weight_R[:, None]
        out_TD = weighted_RD.new_zeros((plan.num_tokens, y_RD.shape[1]))
        return out_TD.index_add(0, plan.token_idx_R, weighted_RD)
