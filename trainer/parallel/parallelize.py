"""Apply the (expert replica, ep) layout to a model that was built without process groups.

    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)      # every expert, no storage, no groups
    parallelize(model, layout, seed, debug_splits)   # keep my experts, hand out groups,
                                                     # materialise, initialise

Initialisation happens after sharding and is still layout-independent: each expert draws
from a seed of (seed, layer, global expert id), each dense tensor from (seed, its name).
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe import MoE
from .dist import Layout


def apply_expert_parallelism(model: nn.Module, layout: Layout, debug_splits: bool = False) -> nn.Module:
    """Shard the experts of every MoE layer over `layout.ep_group`, nothing materialised (the planner
    stops here). Balance statistics are summed over the world group, since every rank is
    data-parallel. Returns `model`, changed in place."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.apply_expert_parallel(layout.ep_group, layout.world_group, debug_splits)
    return model


def parallelize(model: nn.Module, layout: Layout, seed: int, debug_splits: bool = False) -> nn.Module:
    """`apply_expert_parallelism`, then materialise on `layout.device` and initialise. Returns
    `model`, changed in place."""
    apply_expert_parallelism(model, layout, debug_splits)
    model.to_empty(device=layout.device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty gave the meta parameters new storage one by one, untying them
    with torch.no_grad():
        model.init_weights(seed)
    return model
