"""FSDP2 (`torch.distributed.fsdp.fully_shard`) composed with expert parallelism.

    dense parameters   sharded over the world (every rank is data-parallel): one unit per block,
                       the root unit holds the embedding, final norm and lm_head
    routed experts     sharded over their expert-replica (EDP) group, a unit of their own inside the
                       block's; with one replica (ep = world) they are already unique per rank and
                       stay plain tensors, outside every unit
    routers            under bf16 on CUDA, a unit of their own that gathers them in fp32

Gradient semantics (DESIGN invariant 2): FSDP's reduce-scatter averages over its mesh. That is the
dense gradient. The all_to_all backward has already SUMMED each expert's gradient over its EP
group, so the expert unit divides by the world size, not by its EDP size (the factor-of-ep bug);
experts outside any unit are divided by the world size by the engine.

Each shard is held by exactly one rank, so the global gradient norm is one all_reduce of the
ranks' local sums of squares (`local_tensor`), dense and expert alike.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..moe import MoE
from ..moe.experts import Experts
from .dist import Layout


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Fill `param` (sharded or not) from the whole logical tensor `full`, which every rank holds."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def _mesh(group: ProcessGroup, device: torch.device) -> DeviceMesh:
    return DeviceMesh.from_group(group, device.type)


def mixed_precision(dtype: str, device: torch.device) -> Optional[MixedPrecisionPolicy]:
    """bf16 compute with fp32 master weights and fp32 gradient reduction, on CUDA with train.dtype=bf16;
    elsewhere None (autocast, as under the other engines)."""
    if dtype == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_model(model: nn.Module, layout: Layout, world_group: ProcessGroup, reshard_after_forward: bool = True,
                mp_policy: Optional[MixedPrecisionPolicy] = None) -> list[nn.Parameter]:
    """Apply FSDP2 in place: per-block units over `world_group`, the experts' over `layout.expert_dp_group`.
    Returns the expert parameters left outside every unit (one replica each), whose gradients the
    caller divides by the world size."""
    world_mesh = _mesh(world_group, layout.device)
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    unsharded_experts: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, Experts):
            if layout.expert_dp_group is None:
                unsharded_experts.extend(module.parameters())
            else:
                fully_shard(module, mesh=_mesh(layout.expert_dp_group, layout.device), **kwargs)
                # sum over the replicas, then / world: the all_to_all backward summed over the EP group
                module.set_gradient_divide_factor(float(layout.world_size))
                # a SUM and our own division: gloo has no PREMUL_SUM, and NCCL runs the same code
                module.set_force_sum_reduction_for_comms(True)
        elif isinstance(module, MoE) and mp_policy is not None:
            fully_shard(module.router, mesh=world_mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    ignored = set(unsharded_experts)
    for block in model.blocks:
        fully_shard(block, mesh=world_mesh, ignored_params=ignored, **kwargs)
    # the root's parameters are needed again right at the start of backward (lm_head): never reshard them
    fully_shard(model, mesh=world_mesh, ignored_params=ignored, **{**kwargs, "reshard_after_forward": False})
    # outputs of a unit include views (the MoE statistics); nothing writes into them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return unsharded_experts
