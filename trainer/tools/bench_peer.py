"""The peer in the same benchmark run: DeepSpeed's own MoE layer (`deepspeed.moe.layer.MoE`), for
`python -m trainer bench --peer deepspeed`.

At equal active FLOPs on the same tokens: DeepSpeed's experts are its usual two-matmul GELU MLP,
so their hidden size is 1.5x our SwiGLU's (3 * D * F = 2 * D * 1.5F multiply-adds per token and
expert). Its gate is used as users get it (top-1 or top-2; random token selection and second-expert
sampling on, its defaults): capacity mode with our capacity factor (`drop_tokens=True`,
`min_capacity=0`), or no-drop (`drop_tokens=False`) for our dropless cases. Its experts are
sharded over the same process group as ours, registered with DeepSpeed's group registry.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import nn


def peer_problem(top_k: int) -> Optional[str]:
    """Why DeepSpeed's layer cannot run this case, or None."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "deepspeed is not installed (bash launch/setup.sh --deepspeed)"
    if top_k > 2:
        return f"DeepSpeed's gate supports top-1 and top-2, the case has top_k={top_k}"
    return None


def peer_d_ff(d_ff: int) -> int:
    """Hidden size of a GELU MLP with the FLOPs of a SwiGLU of hidden size `d_ff`."""
    return round(1.5 * d_ff)


def deepspeed_layer(d_model: int, d_ff: int, num_experts: int, top_k: int, capacity_factor: Optional[float],
                    group, device: torch.device, seed: int = 0) -> nn.Module:
    """DeepSpeed's MoE layer with its experts sharded over `group` (None: this process alone)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.utils import groups as ds_groups

    from ..parallel.dist import join_world_alone

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    world_group = join_world_alone("nccl" if device.type == "cuda" else "gloo") if group is None else group
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    ep = torch.distributed.get_world_size(world_group)
    name = f"ep_size_{ep}"
    ds_groups._EXPERT_PARALLEL_GROUP[name] = world_group  # ours, so its all_to_all runs where ours does
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(range(ep))
    torch.manual_seed(seed)
    hidden = peer_d_ff(d_ff)
    expert = nn.Sequential(nn.Linear(d_model, hidden, bias=False), nn.GELU(), nn.Linear(hidden, d_model, bias=False))
    dropless = capacity_factor is None
    layer = DeepSpeedMoE(d_model, expert, num_experts=num_experts, ep_size=ep, k=top_k,
                         capacity_factor=1.0 if dropless else capacity_factor,
                         eval_capacity_factor=1.0 if dropless else capacity_factor,
                         min_capacity=0, drop_tokens=not dropless)
    layer.set_deepspeed_parallelism()
    return layer.to(device)
