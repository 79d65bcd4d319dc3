"""Routing decisions kept for activation checkpointing, so a recompute routes exactly as the forward did.

Shape legend: T tokens on this rank, K top-k.

A checkpointed region (a block, or one MoE layer) runs twice: in the forward, and again in the
backward to rebuild what it did not keep. Routed naively, the second run would draw its training
noise again (a new call index), count its routes towards the expert bias and the `global_batch`
statistics a second time, all_reduce those counts again, exchange token counts again and, wherever
a recomputed score ties differently, send other rows: torch then fails with "recomputed values
have different metadata", or a peer waits on an all_to_all whose splits no longer match.

So the forward RECORDS each MoE call's decision (chosen experts, kept routes, the reduced counts,
the noise offset, the dispatch plan) on a `RoutingTape` that belongs to that one checkpointed call,
and the recompute REPLAYS it: scores, combine weights, balance losses and the experts are
recomputed with gradients; what was decided, counted or exchanged is not. The tape is made by
`checkpoint_contexts`, handed to torch's checkpoint as its `context_fn`, and freed with the graph.

No process groups here: the parallel layer applies checkpointing, the MoE layer consults the tape.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from .dispatch import DispatchPlan


@dataclass
class RoutingDecision:
    """What one MoE forward decided, everything a recompute must not decide again."""

    expert_idx_TK: torch.Tensor  # chosen experts (global ids)
    keep_TK: torch.Tensor  # routes dispatched (valid and within capacity)
    global_counts: torch.Tensor  # the layer's reduced routing counts ([E + 3], see RoutingCounts)
    token_offset: int  # the noise key of the call's first token
    plan: DispatchPlan  # splits and orders of the all_to_all; its weights are rebuilt

    def plan_with_weights(self, weight_TK: torch.Tensor) -> DispatchPlan:
        """The recorded plan carrying the recomputed (differentiable) combine weights."""
        weight_R = weight_TK.reshape(-1).index_select(0, self.plan.route_idx_R)
        return replace(self.plan, weight_R=weight_R)


class RecomputeError(RuntimeError):
    """A recompute asked for a routing decision its forward did not record (a bug, not bad input)."""


class RoutingTape:
    """The decisions of one checkpointed call, per MoE layer in call order."""

    def __init__(self) -> None:
        self._decisions: dict[int, deque[RoutingDecision]] = defaultdict(deque)

    @contextlib.contextmanager
    def _active(self, replaying: bool) -> Iterator[None]:
        token = _ACTIVE.set((self, replaying))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def recording(self):
        return self._active(replaying=False)

    def replaying(self):
        return self._active(replaying=True)


_ACTIVE: contextvars.ContextVar[Optional[tuple[RoutingTape, bool]]] = contextvars.ContextVar(
    "moe_routing_tape", default=None)


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(forward context, recompute context) sharing a fresh tape: torch checkpoint's `context_fn`."""
    tape = RoutingTape()
    return tape.recording(), tape.replaying()


def record(layer: torch.nn.Module, decision: RoutingDecision) -> None:
    """Keep `decision` for the recompute of the checkpointed call now running, if any."""
    active = _ACTIVE.get()
    if active is not None and not active[1]:
        active[0]._decisions[id(layer)].append(decision)


def replayed(layer: torch.nn.Module, where: str) -> Optional[RoutingDecision]:
    """The decision `layer` recorded in its forward when this call is a recompute; else None."""
    active = _ACTIVE.get()
    if active is None or not active[1]:
        return None
    decisions = active[0]._decisions.get(id(layer))
    if not decisions:
        raise RecomputeError(f"{where}: recomputed without a routing decision from its forward")
    return decisions.popleft()

