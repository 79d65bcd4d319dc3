"""Process-group setup and the (data, expert) layout.

Every rank is data-parallel: it gets its own slice of the global batch. Ranks are cut
into EP groups of `ep` contiguous ranks, each holding all experts once; the ranks at the
same position of different EP groups hold the same experts and form an expert-data-parallel
(EDP) group. Dense parameters are replicated on every rank.

    world 4, ep 2:   EP groups [0 1] [2 3]      EDP groups [0 2] [1 3]

Groups of one rank are `None` (no communication), following the `trainer.moe` convention.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .config import ParallelConfig


@dataclass
class Layout:
    rank: int
    world_size: int
    local_rank: int
    ep: int
    device: torch.device
    world_group: Optional[ProcessGroup]  # all ranks: dense gradients, balance statistics, metrics
    ep_group: Optional[ProcessGroup]  # my EP group: token exchange, expert part of the grad norm
    expert_dp_group: Optional[ProcessGroup]  # replicas of my experts: expert gradients

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.ep


def env_world_size() -> int:
    """World size as the launcher announces it, readable before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(preference: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: ParallelConfig, device: torch.device) -> Layout:
    """Initialise the default group (when launched with WORLD_SIZE > 1) and build EP/EDP groups."""
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1:
        return Layout(0, 1, local_rank, cfg.ep, device, None, None, None)

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s), **kwargs)
    ep = cfg.ep
    ep_group = expert_dp_group = None
    # new_group is collective over the world: every rank creates every group, in the same order
    for first in range(0, world_size, ep):
        ranks = list(range(first, first + ep))
        group = dist.new_group(ranks) if ep > 1 else None
        if rank in ranks:
            ep_group = group
    replicas = world_size // ep
    for position in range(ep):
        ranks = list(range(position, world_size, ep))
        group = dist.new_group(ranks) if replicas > 1 else None
        if rank in ranks:
            expert_dp_group = group
    return Layout(rank, world_size, local_rank, ep, device, dist.group.WORLD, ep_group, expert_dp_group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
