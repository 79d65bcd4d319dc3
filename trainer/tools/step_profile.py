"""Where a training step's time goes, for `python -m trainer bench --config CONFIG --profile`.

The step runs under `torch.profiler` with every part labelled from the outside (module hooks and
wrapped dispatcher stages, removed afterwards: the model carries no profiling code). Each op's own
time (self CPU time) is charged to the innermost label around it. A backward op is charged to the
label of the forward op that made its autograd node (matched by sequence number), so "experts"
is the experts' forward and backward. CPU time only: on CUDA this is the host's side of the step.

Parts: embedding/norms/head/loss ("model_other"), attention, dense_ffn, router (scores, top-k,
the statistics all_reduce, balance losses), dispatch (sorting routes, the count exchange,
gathering and regrouping rows), all_to_all (the two row exchanges, including waiting for the
slowest rank of the EP group), experts, combine, shared_experts, grad_sync (reduction and
clipping; all_reduces started from backward hooks count here too), optimizer, "other" (the step's
own bookkeeping: loss all_reduce, host copies) and "untraced" (wall time outside every op: Python).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from ..model import Attention, DenseFFN
from ..moe.experts import Experts, SharedExperts
from ..moe.layer import MoE
from ..moe.router import Router

PARTS = ("model_other", "attention", "dense_ffn", "router", "dispatch", "all_to_all", "experts", "combine",
         "shared_experts", "grad_sync", "optimizer", "other", "untraced")
LABEL = "part:"
MODULE_PARTS = ((Attention, "attention"), (DenseFFN, "dense_ffn"), (Router, "router"), (Experts, "experts"),
                (SharedExperts, "shared_experts"))
# start_send/finish_send (the exchange split around shared experts) hold permute and regroup,
# whose own labels are innermost and win
DISPATCHER_PARTS = {"plan": "dispatch", "permute": "dispatch", "regroup": "dispatch", "exchange": "all_to_all",
                    "start_send": "all_to_all", "finish_send": "all_to_all",
                    "unregroup": "combine", "exchange_back": "all_to_all", "unpermute": "combine"}


def _labelled(fn: Callable, part: str) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(LABEL + part):
            return fn(*args, **kwargs)
    return run


@contextmanager
def _patched(obj, name: str, part: str) -> Iterator[None]:
    """`obj.name` wrapped in a label for the duration, then put back as it was."""
    own = name in vars(obj)
    original = getattr(obj, name)
    setattr(obj, name, _labelled(original, part))
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


@contextmanager
def labelled_parts(model: nn.Module, engine) -> Iterator[None]:
    """Label every part of `model` and the engine's gradient sync and update while inside."""
    with ExitStack() as stack:
        for module in model.modules():
            part = next((p for kind, p in MODULE_PARTS if isinstance(module, kind)), None)
            if part is not None:  # a compiled module (train.compile) runs its compiled call, not forward
                compiled = getattr(module, "_compiled_call_impl", None) is not None
                stack.enter_context(_patched(module, "_compiled_call_impl" if compiled else "forward", part))
            if isinstance(module, MoE):
                stack.enter_context(_patched(module, "route", "router"))
                for name, p in DISPATCHER_PARTS.items():
                    stack.enter_context(_patched(module.dispatcher, name, p))
        stack.enter_context(_patched(engine, "reduce_and_clip", "grad_sync"))
        stack.enter_context(_patched(engine, "step", "optimizer"))
        stack.enter_context(_patched(engine, "forward", "model_other"))
        stack.enter_context(_patched(engine, "backward", "model_other"))
        yield


BACKWARD_NODE = "autograd::engine::evaluate_function:"


def _ancestors(event) -> Iterator:
    """`event`, then the events it ran inside, innermost first."""
    while event is not None:
        yield event
        event = event.cpu_parent


def _own_part(event, parts_by_seq: dict[int, str]) -> str:
    """The innermost label around `event`; for a backward op, its forward op's label."""
    for node in _ancestors(event):
        # a backward op runs inside engine.backward's label (model_other): its forward op decides
        if node.name.startswith(LABEL) and node.name != LABEL + "model_other":
            return node.name[len(LABEL):]
        if node.name.startswith(BACKWARD_NODE):
            return parts_by_seq.get(node.sequence_nr, "model_other")
    return "other"


def _in_backward(event) -> bool:
    return any(node.name.startswith(BACKWARD_NODE) for node in _ancestors(event))


def part_of_forward(event) -> str:
    return next((node.name[len(LABEL):] for node in _ancestors(event) if node.name.startswith(LABEL)), "other")


def profile_steps(run_step: Callable[[], None], steps: int, model: nn.Module, engine) -> dict[str, float]:
    """Milliseconds per step spent in each of PARTS over `steps` calls of `run_step` (this rank)."""
    with labelled_parts(model, engine):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                run_step()
            wall_s = time.perf_counter() - start
    events = [e for e in prof.events() if not e.is_async]
    ms: dict[str, float] = defaultdict(float)
    for e, part in charged_parts(events):
        ms[part] += e.self_cpu_time_total / 1e3
    ms["untraced"] = max(0.0, 1e3 * wall_s - sum(ms.values()))
    return {p: round(ms.get(p, 0.0) / steps, 2) for p in PARTS}


def charged_parts(events: list) -> Iterator[tuple[object, str]]:
    """(event, the part its own time is charged to) for profiler `events` of labelled steps."""
    parts_by_seq: dict[int, str] = {}
    for e in events:  # forward ops that made an autograd node: their label is their backward's
        if e.sequence_nr >= 0 and not _in_backward(e):
            # ops beside the one that made the node may carry its number too (a compiled region's
            # casts, say): a labelled part wins over the unlabelled rest of the model
            part = part_of_forward(e)
            if parts_by_seq.get(e.sequence_nr) in (None, "model_other", "other"):
                parts_by_seq[e.sequence_nr] = part
    for e in events:
        part = _own_part(e, parts_by_seq)
        if part == "model_other" and e.name.startswith("c10d::"):
            part = "grad_sync"  # a gradient all_reduce started by a backward hook
        yield e, part
