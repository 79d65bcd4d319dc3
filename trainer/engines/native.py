"""The native engine: `GradSync` (bucketed all_reduce overlapping the last backward, global-norm
clipping) and torch's AdamW. A step whose loss or gradient norm is not finite is not applied."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import Config
from ..parallel.dist import Layout
from ..parallel.grad_sync import GradSync
from . import adamw, adamw_param_groups, set_lr, zeroed_adamw_state


class NativeEngine:
    name = "native"

    def __init__(self, cfg: Config, model: nn.Module, layout: Layout):
        self.model = model
        self.grad_sync = GradSync(model, layout)
        self.optimizer = adamw(adamw_param_groups(model, cfg), cfg)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        self.grad_sync.expect_backward(last_micro_batch=last)  # its gradient all_reduces overlap it
        (loss / micro_batches).backward()

    def reduce_and_clip(self, max_norm: float) -> Optional[torch.Tensor]:
        self.grad_sync.reduce()
        return self.grad_sync.clip_(max_norm)

    def step(self, lr: float, norm: Optional[float], loss_is_finite: bool) -> float:
        if loss_is_finite and math.isfinite(norm):
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_state(self, for_loading: bool = False) -> torch.optim.Optimizer:
        if for_loading:
            zeroed_adamw_state(self.optimizer.state, self.model.parameters())
        return self.optimizer  # `.state[param]` is what checkpoint.optimizer_entries reads and fills

    def loaded(self, state) -> None:
        pass
