"""What `python -m trainer bench` measures with: wall time across ranks (the slowest rank's),
this machine's matmul peak, and the bytes autograd saves for backward."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .stage_timing import synchronize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # train.dtype and the bench's case dtypes

def max_over_ranks(value: float, group, device) -> float:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def mean_over_ranks(values: list[float], group, device) -> list[float]:
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def timed(fn: Callable[[], None], iters: int, device: torch.device, group) -> float:
    """Seconds per call of `fn`, the slowest rank's (every rank waits for it anyway)."""
    if group is not None:
        dist.barrier(group)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return max_over_ranks((time.perf_counter() - start) / iters, group, device)


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, group, extra_shapes=()) -> float:
    """The best matmul FLOP/s of this machine in `dtype` with this rank's threads, all ranks at
    once (as in the cases): square shapes and the dense reference's own, the best of them."""
    sizes = (1024, 2048) if device.type == "cpu" else (4096, 8192)
    shapes = [(n, n, n) for n in sizes] + list(extra_shapes)
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flops = 2.0 * m * k * n
        iters = max(2, min(50, int(2e10 / flops) if device.type == "cpu" else int(2e13 / flops)))
        a @ b  # warm-up
        for _ in range(3):  # the best of three: a peak, not an average over a noisy machine
            best = max(best, flops / timed(lambda: a @ b, iters, device, group))
    return best


def activation_bytes(fn: Callable[[], torch.Tensor], params, checkpointed: Iterable[nn.Module] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward during `fn`, parameters (and other
    tensors in `params`, e.g. buffers) left out: the activation memory. The inputs of `checkpointed`
    modules count too: activation checkpointing keeps them outside autograd's saved tensors."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor):
        keep(t)
        return t

    def held(module, args):
        for a in args:
            if isinstance(a, torch.Tensor) and torch.is_grad_enabled():
                keep(a)

    hooks = [m.register_forward_pre_hook(held) for m in checkpointed]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(storages.values())
