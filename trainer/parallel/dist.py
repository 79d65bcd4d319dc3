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
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..config import ParallelConfig
from ..launch_env import env_rank, env_world_size
from ..moe.collectives import named_collective


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


def pick_device(preference: str) -> torch.device:
    """The device of this rank; `trainer.run.preflight` has already refused cuda without CUDA."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_backend(cfg: ParallelConfig, device: torch.device) -> str:
    return cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")


def init_world(cfg: ParallelConfig, device: torch.device) -> Optional[ProcessGroup]:
    """Join the default (world) group when launched with WORLD_SIZE > 1; None for one process.

    Only the world group exists afterwards: ranks compare their configs over it
    (`trainer.run.agreement`) before `make_layout` creates groups whose shape depends on the config.
    """
    if env_world_size() == 1:
        return None
    if not dist.is_initialized():
        backend = resolve_backend(cfg, device)
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        with named_collective("process-group setup", f"joining the {backend} world group"):
            store = _restart_safe_store(timeout)
            if store is not None:
                kwargs.update(store=store, rank=env_rank(), world_size=env_world_size())
            dist.init_process_group(backend, timeout=timeout, **kwargs)
    return dist.group.WORLD


def _restart_safe_store(timeout: datetime.timedelta) -> Optional[dist.Store]:
    """Under torchrun, the agent's store with a prefix per restart attempt; else None (env://).

    torchrun keeps one store (same MASTER_PORT) across `--max-restarts` attempts, and gloo's
    rendezvous keys do not name the attempt: restarted workers read the dead workers'
    addresses and time out in connectFullMesh (seen with torch 2.13)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env_world_size(),
                           is_master=False, timeout=timeout)
    return dist.PrefixStore(f"moe-trainer/attempt_{attempt}/", client)


def join_world_alone(backend: str) -> ProcessGroup:
    """A process group of one (in memory) for a single process whose engine needs one (DeepSpeed,
    FSDP); the launcher's variables are set as a launcher would. Returns the world group."""
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        for name in ("LOCAL_RANK", "RANK"):
            os.environ.setdefault(name, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    return dist.group.WORLD


def ep_group_ranks(world_size: int, ep: int) -> list[list[int]]:
    """The EP groups: contiguous runs of `ep` ranks, each holding every expert once."""
    return [list(range(first, first + ep)) for first in range(0, world_size, ep)]


def replica_group_ranks(world_size: int, ep: int) -> list[list[int]]:
    """The expert-data-parallel groups: the ranks at the same position of every EP group."""
    return [list(range(pos, world_size, ep)) for pos in range(ep)]


def new_groups(groups_of_ranks: list[list[int]], rank: int, timeout_s: float) -> Optional[ProcessGroup]:
    """Create one group per list of ranks (a partition of the world); return the one holding `rank`.

    new_group is collective over the world: every rank creates every group, in the same order."""
    timeout = datetime.timedelta(seconds=timeout_s)
    mine = None
    for ranks in groups_of_ranks:
        with named_collective("process-group setup", f"new_group({ranks})"):
            group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine


def make_layout(cfg: ParallelConfig, device: torch.device) -> Layout:
    """Build the EP and expert-data-parallel groups, each with `parallel.timeout_s`."""
    world_size, rank = env_world_size(), env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1:
        return Layout(0, 1, local_rank, cfg.ep, device, None, None, None)
    ep = cfg.ep
    ep_group = new_groups(ep_group_ranks(world_size, ep), rank, cfg.timeout_s) if ep > 1 else None
    replicas = world_size // ep
    expert_dp_group = new_groups(replica_group_ranks(world_size, ep), rank, cfg.timeout_s) if replicas > 1 else None
    return Layout(rank, world_size, local_rank, ep, device, dist.group.WORLD, ep_group, expert_dp_group)


def shutdown(all_ranks_here: bool = False, timeout_s: float = 60.0) -> None:
    """Destroy the process groups. With `all_ranks_here` (a run that ended normally, so every rank
    is on its way out), first meet through the rendezvous store: a rank that tears gloo down
    while a peer is still finishing the last collective aborts that peer in C++ ("terminate called
    without an active exception", seen under load). The store is not the group, so a meeting
    never touches a collective; it waits at most `timeout_s`."""
    if not dist.is_initialized():
        return
    if all_ranks_here and dist.get_world_size() > 1:
        store = dist.distributed_c10d._get_default_store()
        store.add("moe-trainer/finished", 1)
        deadline = time.monotonic() + timeout_s
        while store.add("moe-trainer/finished", 0) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.01)
    dist.destroy_process_group()
