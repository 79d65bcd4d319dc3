"""Uneven inputs under expert parallelism: ranks that run out of work keep the collectives paired.

Every MoE forward is a collective over its EP group, so a rank that stops calling the model
(its generation finished, its last uneven batch is done) would leave its peers waiting in an
all_to_all. The pattern, for inference, generation or evaluation of uneven shards:

    finished = False
    while not all_finished(finished, group, device):
        if finished:
            model(empty_tokens)          # zero tokens: joins every collective, adds nothing
        else:
            ... a real forward ...; finished = ...

An MoE layer accepts zero tokens in every configuration (capacity, scopes, bias): its
collectives run with empty splits and its losses are zero on that rank.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributed import ProcessGroup

from .collectives import all_reduce_sum_


def all_finished(finished: bool, group: Optional[ProcessGroup], device: torch.device = torch.device("cpu"),
                 where: str = "join") -> bool:
    """Collective over `group`: True once every rank has passed `finished=True` (each call)."""
    unfinished = torch.tensor([0.0 if finished else 1.0], device=device)
    all_reduce_sum_(unfinished, group, where, "all_reduce of unfinished ranks")
    return unfinished.item() == 0
