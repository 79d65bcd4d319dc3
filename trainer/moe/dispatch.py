"""Moves routed tokens to the ranks that own their experts and brings the results back.

Shape legend: T tokens on this rank, D model dim, K top-k, E experts (global),
P ranks in the EP group, L = E/P local experts, R routes this rank sends (kept routes,
sorted by expert), X rows this rank's experts process.

dispatch = plan (sort routes by expert, exchange counts, one device-to-host copy of them)
           -> permute (gather the rows of kept routes) -> exchange (uneven all_to_all)
           -> regroup (rank-major to local-expert-major)
combine  = unregroup -> exchange_back -> unpermute (weighted scatter-add into [T, D]).
Received rows arrive in (source rank, local expert) blocks. Experts that take row blocks (the
expert loop) work on those blocks where they lie when the blocks are large: no regroup saves two
passes over the rows each way. Small blocks are regrouped, one per expert, because a matmul of
a few rows runs far below peak (bf16 on CPU: 0.4 of it at 32 rows, measured); grouped GEMM
always needs one block per expert.
Each stage is a public method, so a benchmark can time them one by one (`trainer.tools.bench`).

Receive splits always come from the all_to_all of counts, never from a guess. With
`debug_splits`, every rank also all-gathers the whole split matrix and checks it, because
gloo fills mismatched splits with garbage instead of failing. Nothing is kept on `self`
between stages: `plan` returns a `DispatchPlan` that every later stage takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed import ProcessGroup

from .collectives import (CollectiveError, all_gather_tensor, all_to_all_counts, all_to_all_rows, group_rank,
                          group_size, start_all_to_all_rows, wait_all_to_all_rows)
from .router import Routing, count_per_bucket


@dataclass
class DispatchPlan:
    num_tokens: int
    route_idx_R: torch.Tensor  # index into the flattened [T * K] routes of each sent route
    token_idx_R: torch.Tensor  # source token of each sent route
    weight_R: torch.Tensor  # fp32 combine weight of each sent route
    send_splits: list[int]  # rows sent to each rank of the EP group
    recv_splits: list[int]  # rows received from each rank of the EP group
    tokens_per_local_expert: list[int]
    expert_major_idx_X: Optional[torch.Tensor]  # rank-major received row of each expert-major row
    row_blocks: list[tuple[int, int, int]]  # (local expert, first row, end row) of the rows the experts get


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


def received_row_blocks(counts_PL: torch.Tensor, expert_major: bool) -> list[tuple[int, int, int]]:
    """(local expert, first row, end row) of the received rows, in the order they lie: grouped by
    expert (`expert_major`), else by source rank then expert; adjacent rows of one expert are one block."""
    P, L = counts_PL.shape
    block_counts = counts_PL.t() if expert_major else counts_PL  # [L, P] or [P, L]
    blocks: list[tuple[int, int, int]] = []
    start = 0
    for i, n in enumerate(block_counts.reshape(-1).tolist()):
        if n:
            expert = i // P if expert_major else i % L
            if blocks and blocks[-1][0] == expert and blocks[-1][2] == start:
                blocks[-1] = (expert, blocks[-1][1], start + n)
            else:
                blocks.append((expert, start, start + n))
        start += n
    return blocks


class LoadError(RuntimeError):
    """An EP rank would receive more rows than `max_recv_factor` allows; the same on every rank."""


class Dispatcher:
    regroup_below_rows = 128  # expert_major=None: regroup when received blocks average fewer rows

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
        """Rows for this rank's experts, grouped by local expert, and the plan to bring them back.

        `global_routed_E` (routes per expert summed over every data-parallel rank, the same on
        all of them) lets a dropless layer refuse a load over `max_recv_factor` before moving rows."""
        plan = self.plan(routing, global_routed_E, phase)
        return self.send(x_TD, plan), plan

    def send(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The rows of `plan` for this rank's experts, grouped by local expert: permute -> exchange -> regroup."""
        return self.regroup(self.exchange(self.permute(x_TD, plan), plan), plan)

    def start_send(self, x_TD: torch.Tensor, plan: DispatchPlan):
        """`send`, split at the exchange: permute and start the all_to_all; work done before
        `finish_send` overlaps the exchange (and, in backward, the gradients' exchange)."""
        x_RD = self.permute(x_TD, plan)
        if self.ep_size == 1:
            return x_RD, None
        return start_all_to_all_rows(x_RD, plan.send_splits, plan.recv_splits, self.ep_group, self.where)

    def finish_send(self, started, plan: DispatchPlan) -> torch.Tensor:
        rows, flight = started
        return self.regroup(rows if flight is None else wait_all_to_all_rows(rows, flight), plan)

    def plan(self, routing: Routing, global_routed_E: Optional[torch.Tensor] = None,
             phase: str = "training", expert_major: Optional[bool] = True) -> DispatchPlan:
        """Sort routes by expert, exchange counts, and bring every count the host needs over in
        ONE device-to-host copy (the layer's only one); dropped routes are sorted out, not filtered
        with `nonzero`. `expert_major=False`: the experts take the received (source rank, local
        expert) blocks as they are, nothing is regrouped; None: regroup only when the blocks
        average fewer than `regroup_below_rows` rows."""
        P, L, E = self.ep_size, self.num_local_experts, self.num_experts
        K = routing.expert_idx_TK.shape[1]
        bucket_N = torch.where(routing.keep_TK, routing.expert_idx_TK, E).reshape(-1)  # dropped/padding: last
        order_N = torch.argsort(bucket_N, stable=True)  # stable: each expert's rows keep token order
        send_counts_PL = count_per_bucket(bucket_N, E + 1)[:E].view(P, L)
        recv_counts_PL = send_counts_PL
        if P > 1:
            if self.debug_splits:  # before the count exchange, which mismatched shapes would corrupt
                self._check_layer_shapes(send_counts_PL.device)
            recv_counts_PL = all_to_all_counts(send_counts_PL, self.ep_group, self.where)
            if self.debug_splits:
                self._check_split_matrix(send_counts_PL, recv_counts_PL)
        parts = [send_counts_PL.reshape(-1), recv_counts_PL.reshape(-1)]
        if global_routed_E is not None and self.max_recv_factor is not None and P > 1:
            parts.append(global_routed_E.to(send_counts_PL.dtype))
        host = torch.cat(parts).cpu()
        send_PL, recv_PL = host[:P * L].view(P, L), host[P * L:2 * P * L].view(P, L)
        if host.numel() > 2 * P * L:
            self._check_load(host[2 * P * L:].view(P, L).sum(1), phase)
        route_idx_R = order_N[:int(send_PL.sum())]  # a host count: slicing needs no sync
        if expert_major is None:
            expert_major = int(recv_PL.sum()) < self.regroup_below_rows * P * L
        expert_major_idx_X = None
        if P > 1 and L > 1 and expert_major:
            expert_major_idx_X = regroup_index(recv_PL).to(bucket_N.device, non_blocking=True)
        return DispatchPlan(
            num_tokens=routing.expert_idx_TK.shape[0],
            route_idx_R=route_idx_R,
            token_idx_R=route_idx_R // K,
            weight_R=routing.weight_TK.reshape(-1).index_select(0, route_idx_R),
            send_splits=send_PL.sum(1).tolist(),
            recv_splits=recv_PL.sum(1).tolist(),
            tokens_per_local_expert=recv_PL.sum(0).tolist(),
            expert_major_idx_X=expert_major_idx_X,
            row_blocks=received_row_blocks(recv_PL, expert_major or P == 1),
        )

    def permute(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """[R, D]: the row of every kept route, in (destination rank, local expert) order.
        index_select, not x[idx]: its backward is one index_add, not an accumulating index_put."""
        return x_TD.index_select(0, plan.token_idx_R)

    def exchange(self, x_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Uneven all_to_all: the rows this rank's experts process, in (source rank, local expert) order."""
        if self.ep_size == 1:
            return x_RD
        return all_to_all_rows(x_RD, plan.send_splits, plan.recv_splits, self.ep_group, self.where)

    def regroup(self, x_recv: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """(source rank, local expert) blocks -> (local expert, source rank) blocks."""
        if plan.expert_major_idx_X is None:
            return x_recv
        return x_recv.index_select(0, plan.expert_major_idx_X)

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
        """[T, D] fp32: each token's expert outputs, weighted and summed (the inverse of `dispatch`)."""
        return self.unpermute(self.exchange_back(self.unregroup(y_XD, plan), plan), plan)

    def unregroup(self, y_XD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if plan.expert_major_idx_X is None:
            return y_XD
        # row i of y_XD came from received row expert_major_idx_X[i]: put it back there (in place
        # into a new buffer, not a copy of one; the backward is an index_select, no inverse is built)
        return torch.empty_like(y_XD).index_copy_(0, plan.expert_major_idx_X, y_XD)

    def exchange_back(self, y_recv: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if self.ep_size == 1:
            return y_recv
        return all_to_all_rows(y_recv, plan.recv_splits, plan.send_splits, self.ep_group, self.where)

    def unpermute(self, y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # weighted in fp32; dropped routes add nothing, the residual stream carries their token
        weighted_RD = y_RD.float() * plan.weight_R[:, None]
        out_TD = weighted_RD.new_zeros((plan.num_tokens, y_RD.shape[1]))
        return out_TD.index_add(0, plan.token_idx_R, weighted_RD)
