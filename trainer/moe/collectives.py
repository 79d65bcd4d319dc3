"""The few collectives the MoE layer needs, with our own autograd for all_to_all.

Convention in this package: a process group of `None` means "no communication" (one
process, or a group of one), never torch's default group. The trainer passes real groups.

Failures (a peer died, the collective timed out) are re-raised as `CollectiveError` with
the name of the layer and the operation, so a hang becomes an error a person can place.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the layer and the operation."""


def group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


@contextmanager
def named_collective(where: str, what: str) -> Iterator[None]:
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(f"{where}: {what} failed: {first_line}") from e


def all_reduce_sum_(tensor: torch.Tensor, group: Optional[ProcessGroup], where: str, what: str) -> torch.Tensor:
    """In-place sum over `group`; a no-op without a group."""
    if group is not None:
        with named_collective(where, what):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_to_all_counts(send_counts: torch.Tensor, group: ProcessGroup, where: str) -> torch.Tensor:
    """Equal-split all_to_all of a count tensor whose first dim is the group size."""
    recv_counts = torch.empty_like(send_counts)
    with named_collective(where, "all_to_all of token counts"):
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


def all_gather_tensor(tensor: torch.Tensor, group: ProcessGroup, where: str, what: str) -> torch.Tensor:
    """Stack `tensor` from every rank of `group` along a new first dim."""
    parts = [torch.empty_like(tensor) for _ in range(group_size(group))]
    with named_collective(where, what):
        dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


class _AllToAllRows(torch.autograd.Function):
    """Uneven all_to_all of rows; the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x_ND, send_splits, recv_splits, group, where):
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.where = send_splits, recv_splits, group, where
        out = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        with named_collective(where, "all_to_all of tokens"):
            dist.all_to_all_single(out, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.send_splits), *grad_out.shape[1:]))
        with named_collective(ctx.where, "all_to_all of token gradients"):
            dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_in, None, None, None, None


def all_to_all_rows(
    x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: ProcessGroup, where: str
) -> torch.Tensor:
    """Send `send_splits[r]` consecutive rows to rank r of `group`; receive `recv_splits[r]` from it."""
    return _AllToAllRows.apply(x_ND, send_splits, recv_splits, group, where)


class RowsInFlight:
    """An uneven all_to_all of rows started by `start_all_to_all_rows`; `wait_all_to_all_rows` ends it.

    The same pair serves the backward in reverse: the wait's backward starts the gradients' exchange
    and the start's backward waits for it, so whatever autograd runs between the two (the work the
    forward overlapped) overlaps the backward exchange too."""

    def __init__(self, send_splits: list[int], recv_splits: list[int], group: ProcessGroup, where: str):
        self.send_splits, self.recv_splits, self.group, self.where = send_splits, recv_splits, group, where
        self.work = None
        self.keep: Optional[torch.Tensor] = None  # the contiguous input, alive until the exchange ends
        self.rows: Optional[torch.Tensor] = None  # the receive buffer (not valid before the wait)

    def start(self, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], what: str) -> torch.Tensor:
        self.keep = x_ND.contiguous()
        self.rows = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        with named_collective(self.where, what):
            self.work = dist.all_to_all_single(self.rows, self.keep, recv_splits, send_splits, group=self.group,
                                               async_op=True)
        return self.rows

    def wait(self, what: str) -> torch.Tensor:
        with named_collective(self.where, what):
            self.work.wait()
        rows, self.work, self.keep, self.rows = self.rows, None, None, None
        return rows


class _StartAllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, flight):
        ctx.flight = flight
        return flight.start(x_ND, flight.send_splits, flight.recv_splits, "all_to_all of tokens")

    @staticmethod
    def backward(ctx, grad_sent):  # the gradient the wait's backward is sending back: done once received
        return ctx.flight.wait("all_to_all of token gradients"), None


class _WaitAllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_pending, flight):
        ctx.flight = flight
        return flight.wait("all_to_all of tokens").view_as(rows_pending)

    @staticmethod
    def backward(ctx, grad_out):
        f = ctx.flight
        f.start(grad_out, f.recv_splits, f.send_splits, "all_to_all of token gradients")
        # the start's backward receives this and waits for the exchange; it carries no values itself
        return grad_out, None


def start_all_to_all_rows(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: ProcessGroup,
                          where: str) -> tuple[torch.Tensor, RowsInFlight]:
    """`all_to_all_rows`, started: returns (a receive buffer to hand only to `wait_all_to_all_rows`, the exchange)."""
    flight = RowsInFlight(send_splits, recv_splits, group, where)
    return _StartAllToAllRows.apply(x_ND, flight), flight


def wait_all_to_all_rows(rows_pending: torch.Tensor, flight: RowsInFlight) -> torch.Tensor:
    """The received rows of a started exchange (differentiable, like `all_to_all_rows`)."""
    return _WaitAllToAllRows.apply(rows_pending, flight)
