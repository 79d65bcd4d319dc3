"""Run a function in N real processes joined by a real gloo process group."""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout_s: float, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        fn(rank, world_size, *args)
        _wait_for_every_rank(store, rank, world_size, timeout_s)
    finally:
        dist.destroy_process_group()


def _wait_for_every_rank(store, rank: int, world_size: int, timeout_s: float) -> None:
    """No rank tears its group down while a peer is still inside a collective: under load that
    aborts the peer in gloo's C++ ("terminate called without an active exception"). This meets
    through the store, not the group, because some tests leave the group broken on purpose.
    Rank 0 hosts the store, so it leaves last."""
    deadline = time.monotonic() + timeout_s

    def wait_until(key: str, count: int) -> None:
        while store.add(key, 0) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    store.add("finished", 1)
    wait_until("finished", world_size)
    if rank == 0:
        wait_until("left", world_size - 1)
    else:
        store.add("left", 1)


def run_processes(fn, world_size: int, *args, timeout_s: float = 120.0) -> None:
    """Call fn(rank, world_size, *args) in `world_size` processes; a failure on any rank fails the caller."""
    mp.spawn(_worker, args=(world_size, free_port(), timeout_s, fn, args), nprocs=world_size, join=True)


def groups_of(ranks_per_group: int, world_size: int, strided: bool = False):
    """Create every group of a partition of the world (collectively) and return the caller's."""
    rank = dist.get_rank()
    mine = None
    n_groups = world_size // ranks_per_group
    for g in range(n_groups):
        ranks = list(range(g, world_size, n_groups)) if strided else list(range(g * ranks_per_group, (g + 1) * ranks_per_group))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine if ranks_per_group > 1 else None
