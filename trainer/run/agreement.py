"""Ranks agree, or the run stops (DESIGN invariant 7).

Before the first model collective, every rank sends its resolved config, its corpus
fingerprint and any problem it met while starting (rank 0: the run.dir lock) to every other
rank, in one `all_gather_object` over the world group. Each rank then reaches the same
verdict from the same list, so all stop together with the same line instead of training
different models, crashing inside gloo, or waiting for a peer that never comes.

After initialisation, `check_replicas_identical` compares a bitwise checksum of every
replicated tensor over the world and of every expert over its replicas.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from ..config import Config, to_dict
from ..moe.collectives import all_gather_tensor, named_collective

RANK_LOCAL_KEYS = frozenset({"run.progress"})  # may differ between ranks without changing the model


class AgreementError(ValueError):
    """Ranks started with different configs or data, or one could not start; the same on every rank."""


class ReplicaMismatchError(RuntimeError):
    """Tensors that must be identical on several ranks are not."""


def flat_config(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(values: dict, prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif f"{prefix}{key}" not in RANK_LOCAL_KEYS:
                flat[f"{prefix}{key}"] = value

    walk(to_dict(cfg), "")
    return flat


@dataclass
class StartReport:
    """What one rank brings to the start-up comparison."""

    config: dict[str, Any]
    data_fingerprint: Optional[str]
    problem: Optional[str] = None  # a one-line error this rank met while starting


def _ranks_by_value(values: list[Any]) -> str:
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(repr(value), []).append(rank)
    return "; ".join(f"{value} on rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}"
                     for value, ranks in groups.items())


def verdict(reports: list[StartReport], max_keys: int = 6) -> Optional[str]:
    """The one line every rank prints, or None when all ranks agree and none met a problem."""
    problems = [(rank, r.problem) for rank, r in enumerate(reports) if r.problem]
    if problems:
        if len({p for _, p in problems}) == 1 and len(problems) == len(reports):
            return problems[0][1]
        rank, problem = problems[0]
        return problem if rank == 0 and len(problems) == 1 else f"rank {rank}: {problem}"
    differing = [key for key in reports[0].config
                 if any(r.config.get(key, "<missing>") != reports[0].config[key] for r in reports[1:])]
    parts = [f"{key} ({_ranks_by_value([r.config.get(key) for r in reports])})" for key in differing[:max_keys]]
    if len(differing) > max_keys:
        parts.append(f"and {len(differing) - max_keys} more keys")
    if len({r.data_fingerprint for r in reports}) > 1:
        parts.append(f"data (corpus fingerprint {_ranks_by_value([r.data_fingerprint for r in reports])})")
    if parts:
        return "ranks started with different settings, each would train a different model: " + ", ".join(parts)
    return None


def gather_reports(report: StartReport, world_group: Optional[ProcessGroup]) -> list[StartReport]:
    if world_group is None:
        return [report]
    reports: list[Any] = [None] * dist.get_world_size(world_group)
    with named_collective("start-up agreement", "all_gather of configs and data fingerprints"):
        dist.all_gather_object(reports, dataclasses.asdict(report), group=world_group)
    return [StartReport(**r) for r in reports]


def require_agreement(report: StartReport, world_group: Optional[ProcessGroup]) -> None:
    line = verdict(gather_reports(report, world_group))
    if line is not None:
        raise AgreementError(line)


# ----------------------------------------------------------------------------- replicas


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Two int64 sums of the tensor's bit pattern (plain and position-weighted); wrap-around is fine."""
    bits = t.detach().contiguous().view(-1).view(torch.uint8)
    pad = (-bits.numel()) % 4
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    words = bits.view(torch.int32).to(torch.int64)
    weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % 65_521 + 1
    return torch.stack([words.sum(), (words * weights).sum()])


def first_difference(named: list[tuple[str, torch.Tensor]], group: Optional[ProcessGroup], what: str) -> Optional[str]:
    """The line naming the first tensor that differs between ranks of `group`, or None."""
    if group is None or not named:
        return None
    sums_N2 = torch.stack([_checksum(t) for _, t in named])
    all_GN2 = all_gather_tensor(sums_N2, group, "start-up check", f"all_gather of {what} checksums")
    differs_GN = (all_GN2 != all_GN2[0]).any(-1)
    if not bool(differs_GN.any()):
        return None
    ranks = dist.get_process_group_ranks(group)
    index = int(differs_GN.any(0).nonzero()[0])
    bad = [ranks[g] for g in differs_GN[:, index].nonzero().squeeze(1).tolist()]
    return (f"{what} {named[index][0]} differs between rank {ranks[0]} and "
            f"rank{'s' if len(bad) > 1 else ''} {','.join(map(str, bad))} after initialisation")


def check_identical(named: list[tuple[str, torch.Tensor]], group: Optional[ProcessGroup], what: str) -> None:
    """Raise ReplicaMismatchError naming the first tensor that differs between ranks of `group`."""
    problem = first_difference(named, group, what)
    if problem is not None:
        raise ReplicaMismatchError(problem)


def check_replicas_identical(model: nn.Module, expert_params: list[nn.Parameter], world_group: Optional[ProcessGroup],
                             expert_dp_group: Optional[ProcessGroup]) -> None:
    """Replicated tensors equal over the world; each expert equal over its replicas."""
    experts = {id(p) for p in expert_params}
    named = list(model.named_parameters())
    check_identical([(n, p) for n, p in named if id(p) not in experts], world_group, "replicated parameter")
    problem = first_difference([(n, p) for n, p in named if id(p) in experts], expert_dp_group, "expert parameter")
    if world_group is not None and expert_dp_group is not None:
        # only the replicas of an expert see its mismatch: share it, so every rank stops with the same line
        problems: list[Optional[str]] = [None] * dist.get_world_size(world_group)
        with named_collective("start-up check", "all_gather of expert check results"):
            dist.all_gather_object(problems, problem, group=world_group)
        problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise ReplicaMismatchError(problem)
