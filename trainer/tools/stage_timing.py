"""Time one MoE layer's forward+backward stage by stage, for `python -m trainer bench`.

The layer's own `forward` is one autograd graph, so its backward cannot be timed per stage.
Here the same stages run as separate graphs: every stage starts from detached copies of its
inputs, and the backward walks the stages in reverse, handing each one the gradients the
next one produced. The result equals `layer(x)` and its gradients (a test checks this), so
the split is of the real work; only the boundaries between stages are extra.

Stages: router (scores, top-k, capacity, the statistics all_reduce, balance losses),
permute (sort routes, exchange counts, gather rows, regroup; and the inverse regroup),
all_to_all (the two row exchanges), experts, combine (the weighted scatter-add).
The all_to_all time includes waiting for the slowest rank of the EP group.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator, Optional

import torch

from ..moe.layer import MoE

STAGES = ("router", "permute", "all_to_all", "experts", "combine")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Milliseconds spent per stage (device-synchronised around each one)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.ms[stage] += 1e3 * (time.perf_counter() - start)


class _Tape:
    """Stages run as separate autograd graphs; `backward` replays them in reverse."""

    def __init__(self, clock: StageClock):
        self.clock = clock
        self.entries: list[tuple[str, tuple, tuple, tuple]] = []  # stage, outputs, leaves, the inputs they stand for

    def run(self, stage: str, fn: Callable, *inputs: torch.Tensor):
        leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs)
        with self.clock(stage):
            outputs = fn(*leaves)
        self.entries.append((stage, outputs if isinstance(outputs, tuple) else (outputs,), leaves, inputs))
        return outputs

    def backward(self, seeds: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """`seeds`: gradient per id(output tensor); returns gradients per id(input tensor)."""
        grads = dict(seeds)
        for stage, outputs, leaves, inputs in reversed(self.entries):
            pairs = [(o, grads.pop(id(o))) for o in outputs
                     if isinstance(o, torch.Tensor) and o.requires_grad and id(o) in grads]
            if not pairs:
                continue
            with self.clock(stage):
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            for leaf, source in zip(leaves, inputs):
                if leaf.grad is not None:
                    grads[id(source)] = grads[id(source)] + leaf.grad if id(source) in grads else leaf.grad
        return grads


def staged_forward_backward(layer: MoE, x_TD: torch.Tensor, grad_out_TD: torch.Tensor, aux_coef: float,
                            z_coef: float, clock: StageClock, autocast_dtype: Optional[torch.dtype] = None):
    """What `layer(x_TD)` followed by backward of (out * grad_out).sum() + aux_coef * aux + z_coef * z
    computes, stage by stage. Returns (out_TD, grad of x_TD, rows the local experts processed);
    parameter gradients accumulate in `.grad` as usual."""
    tape = _Tape(clock)
    device_type = x_TD.device.type
    x_TD = x_TD.detach().requires_grad_()
    dispatcher = layer.dispatcher

    def route(x):
        routing, counts, aux, z = layer.route(x)
        return routing.weight_TK, aux * aux_coef + z * z_coef, routing, counts

    weight_TK, balance_loss, routing, counts = tape.run("router", route, x_TD)
    routing = replace(routing, weight_TK=weight_TK.detach())  # combine takes the weights from the tape
    # the layer sends half-width rows under autocast; the cast is part of the permute stage
    half = x_TD if autocast_dtype is None else tape.run("permute", lambda x: x.to(autocast_dtype), x_TD)
    plan = tape.run("permute", lambda: layer.plan_dispatch(routing, counts, half))
    x_RD = tape.run("permute", lambda x: dispatcher.permute(x, plan), half)
    x_recv = tape.run("all_to_all", lambda x: dispatcher.exchange(x, plan), x_RD)
    x_XD = tape.run("permute", lambda x: dispatcher.regroup(x, plan), x_recv)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        y_XD = tape.run("experts", lambda x: layer.experts(x, plan.tokens_per_local_expert, plan.row_blocks), x_XD)
    y_recv = tape.run("permute", lambda y: dispatcher.unregroup(y, plan), y_XD)
    y_RD = tape.run("all_to_all", lambda y: dispatcher.exchange_back(y, plan), y_recv)

    def combine(y, w_TK):
        return dispatcher.unpermute(y, replace(plan, weight_R=w_TK.reshape(-1).index_select(0, plan.route_idx_R)))

    out_TD = tape.run("combine", combine, y_RD, weight_TK)
    grads = tape.backward({id(out_TD): grad_out_TD, id(balance_loss): torch.ones_like(balance_loss)})
    return out_TD, grads.get(id(x_TD)), int(sum(plan.tokens_per_local_expert))
