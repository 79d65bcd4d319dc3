"""Token-choice top-k router: fp32 scores, capacity and drops, and the balance losses.

Shape legend: T tokens (on this rank), D model dim, E experts (global), K top-k,
N = T*K routes.

The router is pure: it sees only this rank's tokens and performs no collective. It returns
this rank's routing counts (`local_counts`); the MoE layer sums them over its stats group (the
one reduction) and hands the global counts to `balance_losses`.

Scores. `softmax` (default): probabilities over all E experts. `sigmoid` (DeepSeek-V3): an
independent score per expert; the combine weights are the chosen scores, renormalised over
the k when k > 1 (`normalize_top_k`), and the balance statistics use each token's scores
normalised to sum to one. `route_scale` multiplies the combine weights (DeepSeek-V3: 2.5).

Expert bias (aux-loss-free balancing, DeepSeek-V3). `expert_bias_E` is added to the scores
only to choose the k experts; the combine weights and balance statistics use the unbiased
scores. Training forwards with gradients enabled add their global counts to
`pending_counts_E` (eval and no-grad forwards do not); `update_expert_bias` then moves each
bias by `rate * sign(mean load - load)` once per optimizer step and re-centres it at zero.
The bias is a buffer: checkpoints carry it.

Group-limited routing (DeepSeek-V3). With `n_groups` > 1 the experts form `n_groups`
contiguous groups (with n_groups = EP size, a group is an EP rank); each token first picks
its `topk_groups` best groups, scored by the sum of their two best expert scores, and then
its k experts within them only, so its rows go to at most `topk_groups` ranks.

Balance scope (`aux_loss_scope`), all in the Switch form E * sum_i f_i * P_i (1.0 when
balanced), with P_i the mean normalised score of expert i:
  * `micro_batch`: f from this forward's routes summed over every data-parallel rank
    (Megatron's). The objective depends on how the step is cut into micro-batches.
  * `global_batch`: f from the PREVIOUS optimizer step's routes over all its micro-batches
    and ranks (`prev_counts_E`, a checkpointed buffer). f carries no gradient, so taking it
    one step late changes nothing in how the loss is differentiated, and it is the only
    choice known before the step's first backward: the objective is then identical for any
    world size and any gradient accumulation. The first step has no previous counts: f is
    uniform, the aux loss is exactly 1 and gives no gradient.
  * `sequence` (DeepSeek-V3): f and P per sequence, the loss averaged over every sequence
    of the global batch.

Noise (training forwards only). `router_jitter` eps multiplies the router's input by
U(1 - eps, 1 + eps) per element (Switch); `noisy_topk` adds N(0, 1) * softplus(x W_noise) to
the logits (Shazeer et al. 2017; W_noise is learned, initialised to zero). The noise of a token
is a pure function of (seed, layer, optimizer step, the token's index in the step's global
batch, which the trainer passes as `token_offset`), drawn with
`trainer.seeding.keyed_uniform`: the same whichever rank holds the token and however the
step is cut into micro-batches, so noisy runs keep EP invariance and resume exactly.

Layout invariance. With counts summed over every data-parallel rank, the loss one rank
computes, averaged over ranks by the gradient sync, equals the loss one process computes on
the whole global batch:
  * f_E (share of routes per expert) uses the global route counts;
  * the local share of P_E (mean full-softmax probability) and of the z-loss is
    sum-over-local-tokens * W / global_valid_tokens, so the mean over the W ranks is the
    global mean, whatever the number of valid tokens on each rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..seeding import derived_seed, keyed_uniform, mix64


SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class Routing:
    expert_idx_TK: torch.Tensor  # int64, chosen experts (global ids)
    weight_TK: torch.Tensor  # fp32 combine weights (differentiable)
    keep_TK: torch.Tensor  # bool, route is dispatched (valid token and within capacity)
    prob_sum_E: torch.Tensor  # fp32, per-token normalised scores summed over valid local tokens (differentiable)
    z_sum: torch.Tensor  # fp32 scalar, logsumexp(logits)^2 summed over valid local tokens (differentiable)
    local_counts: torch.Tensor  # int64 [E + 3]: routes per expert before drops, dropped routes, valid tokens, sequences
    entropy_sum: Optional[torch.Tensor] = None  # fp32 scalar, routing-distribution entropy summed over valid local tokens (detached)
    seq_aux_sum: Optional[torch.Tensor] = None  # fp32 scalar, per-sequence aux losses summed over local sequences (sequence scope)
    token_offset: int = 0  # noise key of the first token


@dataclass
class RoutingCounts:
    """Counts of one forward, summed over the stats group: see `RoutingCounts.split`."""

    routed_E: torch.Tensor  # int64, routes per expert before capacity drops
    dropped: torch.Tensor  # int64 scalar, routes dropped by capacity
    valid_tokens: torch.Tensor  # int64 scalar
    sequences: torch.Tensor  # int64 scalar, sequences with at least one valid token
    all: torch.Tensor  # int64 [E + 3], the four above in one tensor

    @staticmethod
    def split(counts: torch.Tensor) -> "RoutingCounts":
        return RoutingCounts(counts[:-3], counts[-3], counts[-2], counts[-1], counts)


AUX_SCOPES = ("micro_batch", "global_batch", "sequence")


def balance_losses(routing: Routing, global_counts: RoutingCounts, stats_ranks: int, top_k: int,
                   scope: str = "micro_batch", prev_counts_E: Optional[torch.Tensor] = None):
    """This rank's shares of the aux loss E * sum_i f_i * P_i and of the z-loss mean(lse^2).

    `global_counts` are summed over the `stats_ranks` ranks whose mean the gradient sync takes;
    `prev_counts_E` are the previous optimizer step's routes (scope `global_batch`).
    """
    E = routing.prob_sum_E.shape[0]
    valid_global = global_counts.valid_tokens.clamp(min=1).double()
    share = (stats_ranks / valid_global).float()
    z_loss = routing.z_sum * share
    if scope == "sequence":
        return routing.seq_aux_sum * (stats_ranks / global_counts.sequences.clamp(min=1).double()).float(), z_loss
    if scope == "global_batch":
        total = prev_counts_E.sum()
        f_E = torch.where(total > 0, prev_counts_E.double() / total.clamp(min=1), torch.full_like(
            prev_counts_E, 1.0 / E, dtype=torch.float64)).float()
    else:
        f_E = (global_counts.routed_E.double() / (valid_global * top_k)).float()
    aux_loss = E * (f_E * routing.prob_sum_E).sum() * share
    return aux_loss, z_loss


def sequence_aux_sum(probs_TE: torch.Tensor, bucket_N: torch.Tensor, valid_T: torch.Tensor, seq_len: int,
                     top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over local sequences of E * sum_i f_si * P_si, number of sequences with a valid token).
    f_si: share of sequence s's routes that chose expert i; P_si: its mean normalised score."""
    T, E = probs_TE.shape
    if T == 0:  # a rank with no tokens this call (uneven inputs): nothing to add
        zero = probs_TE.sum()
        return zero, zero.detach().long()
    n_seq = T // seq_len
    seq_of_N = torch.arange(T, device=probs_TE.device).repeat_interleave(top_k) // seq_len
    counts_sE = torch.zeros(n_seq, E + 1, device=probs_TE.device).index_put_(
        (seq_of_N, bucket_N), torch.ones_like(bucket_N, dtype=torch.float32), accumulate=True)[:, :E]
    valid_s = valid_T.view(n_seq, seq_len).sum(1).float()
    prob_sum_sE = (probs_TE * valid_T.float()[:, None]).view(n_seq, seq_len, E).sum(1)
    per_seq = E * (counts_sE / (top_k * valid_s.clamp(min=1))[:, None]
                   * prob_sum_sE / valid_s.clamp(min=1)[:, None]).sum(1)
    return per_seq.sum(), (valid_s > 0).sum()


def count_per_bucket(bucket_N: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """int64 [num_buckets]: how many entries of `bucket_N` fall in each bucket. A scatter_add,
    not `torch.bincount`, whose CUDA kernel reads the maximum back to the host (a sync)."""
    counts = torch.zeros(num_buckets, dtype=torch.int64, device=bucket_N.device)
    return counts.scatter_add_(0, bucket_N, torch.ones_like(bucket_N, dtype=torch.int64))


def capacity(num_valid_tokens: torch.Tensor, capacity_factor: float, top_k: int, num_experts: int,
             min_capacity: int = 0) -> torch.Tensor:
    """C = max(ceil(cf * T * K / E), min_capacity), T counting valid tokens only. Stays on the device."""
    exact = num_valid_tokens.double() * (capacity_factor * top_k / num_experts)
    # the epsilon absorbs representation error like 1.1 * 10 = 11.000000000000002
    return torch.ceil(exact - 1e-9).clamp(min=min_capacity)


def position_in_expert(expert_idx_N: torch.Tensor, priority_N: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """For each route, how many routes to the same expert come before it in priority order."""
    n = expert_idx_N.numel()
    by_priority = torch.argsort(priority_N, stable=True)
    experts_in_priority = expert_idx_N[by_priority]
    by_expert = torch.argsort(experts_in_priority, stable=True)  # ties keep priority order
    counts_B = count_per_bucket(experts_in_priority, num_buckets)
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    sorted_experts = experts_in_priority[by_expert]
    pos_sorted = torch.arange(n, device=expert_idx_N.device) - starts_B[sorted_experts]
    position_N = torch.empty_like(pos_sorted)
    position_N[by_priority[by_expert]] = pos_sorted
    return position_N


class Router(nn.Module):
    """Linear gate over D -> E, computed in fp32 whatever the autocast or parameter dtype."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        capacity_factor: Optional[float] = None,
        normalize_top_k: Optional[bool] = None,
        drop_policy: str = "position",
        score_func: str = "softmax",
        route_scale: float = 1.0,
        expert_bias: bool = False,
        eval_capacity_factor: Optional[float] = None,
        min_capacity: int = 0,
        n_groups: int = 1,
        topk_groups: int = 1,
        aux_loss_scope: str = "micro_batch",
        router_jitter: float = 0.0,
        noisy_topk: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
        if drop_policy not in ("position", "probs"):
            raise ValueError(f"drop_policy must be 'position' or 'probs', got {drop_policy!r}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if eval_capacity_factor is not None and eval_capacity_factor <= 0:
            raise ValueError(f"eval_capacity_factor must be > 0 or None (dropless), got {eval_capacity_factor}")
        if min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
        if aux_loss_scope not in AUX_SCOPES:
            raise ValueError(f"aux_loss_scope must be one of {AUX_SCOPES}, got {aux_loss_scope!r}")
        if not 0 <= router_jitter < 1:
            raise ValueError(f"router_jitter must be in [0, 1), got {router_jitter}")
        if n_groups < 1 or num_experts % n_groups:
            raise ValueError(f"n_groups={n_groups} must be >= 1 and divide num_experts={num_experts}")
        if n_groups > 1 and not (1 <= topk_groups <= n_groups and topk_groups * (num_experts // n_groups) >= top_k):
            raise ValueError(f"topk_groups={topk_groups} must be in [1, n_groups={n_groups}] and its groups must "
                             f"hold at least top_k={top_k} experts")
        if not route_scale > 0:
            raise ValueError(f"route_scale must be > 0, got {route_scale}")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor, self.min_capacity = capacity_factor, eval_capacity_factor, min_capacity
        # k=1 keeps the raw score (Switch) so the gate learns from the LM loss (a renormalised
        # single weight is always 1); k>1 renormalises over the chosen experts (Mixtral, DeepSeek-V3).
        self.normalize_top_k = top_k > 1 if normalize_top_k is None else normalize_top_k
        self.drop_policy, self.score_func, self.route_scale = drop_policy, score_func, route_scale
        self.n_groups, self.topk_groups, self.aux_loss_scope = n_groups, topk_groups, aux_loss_scope
        self.router_jitter, self.noisy_topk = router_jitter, noisy_topk
        self.noise_seed, self.noise_calls = 0, 0  # set by init_weights; training forwards since finish_step
        self.use_expert_bias = expert_bias  # a flag, not `bias.any()`: that would be a host sync per layer
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        # routes of this optimizer step's training forwards (global), and of the previous step
        self.register_buffer("pending_counts_E", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("prev_counts_E", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.int64))  # finished optimizer steps
        self.noise_weight = nn.Parameter(torch.empty(num_experts, d_model)) if noisy_topk else None

    @property
    def counts_steps(self) -> bool:
        """Whether training forwards must record their counts for `finish_step`."""
        return self.use_expert_bias or self.aux_loss_scope == "global_batch" or self.noisy

    @property
    def active_capacity_factor(self) -> Optional[float]:
        """The capacity factor of this forward: training's, or evaluation's in eval mode (None = dropless)."""
        return self.capacity_factor if self.training else self.eval_capacity_factor

    @property
    def noisy(self) -> bool:
        return self.router_jitter > 0 or self.noisy_topk

    def forward(self, x_TD: torch.Tensor, valid_T: Optional[torch.Tensor] = None,
                seq_len: Optional[int] = None, token_offset: int = 0,
                chosen: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Routing:
        """`seq_len`: tokens per sequence (x_TD holds whole sequences back to back); the sequence
        balance scope needs it, default: all of x_TD is one sequence. `token_offset`: index of
        x_TD's first token in the optimizer step's global batch (keys the training noise).
        `chosen`: (expert_idx_TK, keep_TK) decided by an earlier forward of the same tokens (an
        activation-checkpointing recompute): scores and weights are computed again, choices are not."""
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        noisy = self.noisy and self.training
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_router_TD = x_TD.float()
            if noisy:
                keys_T = token_offset + torch.arange(T, device=x_TD.device)
                x_router_TD = self._jitter(x_router_TD, keys_T)
            logits_TE = F.linear(x_router_TD, self.weight.float())
            if noisy and self.noisy_topk:
                logits_TE = logits_TE + self._normal(keys_T, x_TD.shape[1]) * F.softplus(
                    F.linear(x_router_TD, self.noise_weight.float()))
        if self.score_func == "softmax":
            scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)  # for the balance statistics
        # choose on detached (bias-adjusted, group-limited) scores and weigh by the plain ones; a
        # recompute takes the forward's choice. gather, not topk's values: the same numbers, and
        # the forward and its recompute save the same tensors for backward
        if chosen is not None:
            expert_idx_TK = chosen[0]
        else:
            choice_TE = scores_TE.detach() + self.expert_bias_E if self.use_expert_bias else scores_TE.detach()
            if self.n_groups > 1:
                choice_TE = self._within_best_groups(choice_TE)
            expert_idx_TK = torch.topk(choice_TE, K, dim=-1).indices
        top_p_TK = scores_TE.gather(1, expert_idx_TK)
        weight_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True) if self.normalize_top_k else top_p_TK
        if self.route_scale != 1.0:
            weight_TK = weight_TK * self.route_scale

        if valid_T is None:
            valid_T = torch.ones(T, dtype=torch.bool, device=x_TD.device)
        valid_TK = valid_T[:, None].expand(T, K)
        num_valid = valid_T.sum()

        # routes of padding tokens go to an extra bucket E: no capacity, no statistics
        bucket_N = torch.where(valid_TK, expert_idx_TK, E).reshape(-1)
        routed_E = count_per_bucket(bucket_N, E + 1)[:E]

        keep_TK = valid_TK
        capacity_factor = self.active_capacity_factor
        if chosen is not None:
            keep_TK = chosen[1]
        elif capacity_factor is not None:
            if self.drop_policy == "position":
                # all first choices before any second choice; earlier tokens first within a choice
                priority_N = torch.arange(T * K, device=x_TD.device).view(K, T).t().reshape(-1)
            else:  # "probs": the most confident routes first
                priority_N = torch.argsort(torch.argsort(-top_p_TK.detach().reshape(-1), stable=True))
            position_TK = position_in_expert(bucket_N, priority_N, E + 1).view(T, K)
            cap = capacity(num_valid, capacity_factor, K, E, self.min_capacity)
            keep_TK = valid_TK & (position_TK < cap)
        dropped = (valid_TK & ~keep_TK).sum()

        valid_f_T = valid_T.float()
        seq_aux, n_seq = None, (num_valid > 0).long()
        if self.aux_loss_scope == "sequence":
            seq_aux, n_seq = sequence_aux_sum(probs_TE, bucket_N, valid_T, seq_len or T, K)
        return Routing(
            expert_idx_TK=expert_idx_TK,
            weight_TK=weight_TK,
            keep_TK=keep_TK,
            prob_sum_E=(probs_TE * valid_f_T[:, None]).sum(0),
            z_sum=(torch.logsumexp(logits_TE, dim=-1).square() * valid_f_T).sum(),
            local_counts=torch.cat([routed_E, dropped.view(1), num_valid.view(1), n_seq.view(1)]).to(torch.int64),
            entropy_sum=(torch.special.entr(probs_TE.detach()).sum(-1) * valid_f_T).sum(),
            seq_aux_sum=seq_aux,
            token_offset=token_offset,
        )

    def _keyed(self, keys_T: torch.Tensor, first: int, width: int) -> torch.Tensor:
        """[T, width] uniforms for components [first, first + width) of each token's noise; the
        step enters hashed (XOR), so keys never wrap into another step's however long the run."""
        D, E = self.weight.shape[1], self.num_experts
        keys_TW = keys_T[:, None] * (D + 2 * E) + first + torch.arange(width, device=keys_T.device)
        return keyed_uniform(self.noise_seed, keys_TW ^ mix64(self.noise_step)).float()

    def _jitter(self, x_TD: torch.Tensor, keys_T: torch.Tensor) -> torch.Tensor:
        if self.router_jitter == 0:
            return x_TD
        eps = self.router_jitter
        return x_TD * (1 - eps + 2 * eps * self._keyed(keys_T, 0, x_TD.shape[1]))

    def _normal(self, keys_T: torch.Tensor, d_model: int) -> torch.Tensor:
        """Standard normals [T, E] by Box-Muller from two keyed uniforms per (token, expert)."""
        E = self.num_experts
        u1, u2 = self._keyed(keys_T, d_model, E), self._keyed(keys_T, d_model + E, E)
        return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)

    def _within_best_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """`choice_TE` with the experts outside each token's `topk_groups` best groups set to -inf."""
        T, E, G = choice_TE.shape[0], self.num_experts, self.n_groups
        choice_TGS = choice_TE.view(T, G, E // G)
        group_score_TG = choice_TGS.topk(min(2, E // G), dim=-1).values.sum(-1)
        best_groups_TJ = group_score_TG.topk(self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros(T, G, dtype=torch.bool, device=choice_TE.device).scatter_(1, best_groups_TJ, True)
        return choice_TGS.masked_fill(~keep_TG[:, :, None], float("-inf")).view(T, E)

    def count_step(self, routed_E: torch.Tensor) -> None:
        """Record one training forward's global routes per expert (the MoE layer calls this)."""
        self.pending_counts_E += routed_E.to(self.pending_counts_E.dtype)

    @torch.no_grad()
    def finish_step(self, applied: bool, bias_rate: float = 0.0) -> None:
        """Once per optimizer step: the step's counts become `prev_counts_E` (global_batch scope)
        and move the expert bias; a step that was not applied is forgotten."""
        self.noise_step += 1
        self.noise_calls = 0
        if applied:  # no host sync: a step with no counts changes nothing by construction
            if self.use_expert_bias and bias_rate > 0:
                self.update_expert_bias(bias_rate)
            if self.aux_loss_scope == "global_batch":
                counted = self.pending_counts_E.sum() > 0
                self.prev_counts_E.copy_(torch.where(counted, self.pending_counts_E, self.prev_counts_E))
        self.pending_counts_E.zero_()

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        """bias += rate * sign(mean load - load) from the pending counts, then centred at zero."""
        load_E = self.pending_counts_E.double()  # all zero (nothing counted): sign 0, no change
        self.expert_bias_E += rate * torch.sign(load_E.mean() - load_E).to(self.expert_bias_E.dtype)
        self.expert_bias_E -= self.expert_bias_E.mean()

    def init_weights(self, seed: int, layer_id: int, std: float) -> None:
        gen = torch.Generator().manual_seed(derived_seed(seed, layer_id, "router"))
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=gen) * std)
            self.expert_bias_E.zero_()
            self.pending_counts_E.zero_()
            self.prev_counts_E.zero_()
            self.noise_step.zero_()
            if self.noise_weight is not None:
                self.noise_weight.zero_()
        self.noise_seed = derived_seed(seed, layer_id, "router noise")
