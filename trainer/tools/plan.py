"""`python -m trainer plan CONFIG --nproc N [key=value ...]`: will this layout fit, before launching it?

A dry run for layouts this machine cannot hold (N in the thousands): one process joins torch's
`fake` process-group backend as rank 0 of N (collectives return at once, nothing is sent), builds
the model on the meta device, shards its experts over the EP groups and, under `train.engine=fsdp`,
applies the same FSDP units a real run makes, so the shard shapes are FSDP's own. Nothing is
allocated. Rank 0 is the most loaded rank: FSDP's uneven shards give it the largest chunk, and
balanced routing loads every rank alike. The bytes are `trainer.parallel.memory.memory_plan`'s, the
same function that prints a real run's first plan line.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..build import full_model_on_meta
from ..config import Config
from ..parallel.activation_checkpointing import apply_activation_checkpointing
from ..parallel.dist import make_layout
from ..parallel.fsdp import mixed_precision, shard_model
from ..parallel.memory import describe_plan, memory_plan
from ..parallel.parallelize import apply_expert_parallelism

GPU_MEMORY_GB = {"h100": 80, "h200": 141, "a100": 80}  # per GPU, the largest of each kind


def machine_share_gb(nproc: int) -> float:
    """This machine's RAM divided among the processes that would run on it (one per core at most)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / 2**30 / max(1, min(nproc, os.cpu_count() or 1))


@contextmanager
def fake_world(nproc: int) -> Iterator[None]:
    """Rank 0 of a `fake` process group of `nproc` ranks (the launcher's variables set to match)."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(RANK="0", WORLD_SIZE=str(nproc), LOCAL_RANK="0")
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=nproc)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def plan(cfg: Config, nproc: int, device_memory_gb: float, device: Optional[torch.device] = None) -> dict:
    """The most loaded rank's bytes for `cfg` on `nproc` ranks, and whether they fit in `device_memory_gb`."""
    device = device or torch.device("cpu")
    with fake_world(nproc):
        layout = make_layout(cfg.parallel, torch.device("cpu"))  # the model stays on meta: FSDP shards it there
        model = apply_expert_parallelism(full_model_on_meta(cfg), layout)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        if cfg.train.engine == "fsdp":
            shard_model(model, layout, layout.world_group or dist.group.WORLD, cfg.train.reshard_after_forward,
                        mixed_precision(cfg.train.dtype, device))
        result = memory_plan(model, cfg, layout)
    result["device_memory_bytes"] = int(device_memory_gb * 2**30)
    result["fits"] = result["total_bytes"] <= result["device_memory_bytes"]
    return result


def summary(result: dict, cfg: Config, nproc: int) -> str:
    """One line for people: the layout, the parts in GiB and the verdict."""
    return (f"plan: {nproc} ranks, ep {cfg.parallel.ep}, engine {cfg.train.engine}, activation checkpointing "
            f"{cfg.train.activation_checkpointing}: {describe_plan(result)}")


def print_plan(cfg: Config, nproc: int, device_memory_gb: float, device: Optional[torch.device] = None) -> dict:
    result = plan(cfg, nproc, device_memory_gb, device)
    print(json.dumps(result))
    print(summary(result, cfg, nproc), file=sys.stderr)
    return result
