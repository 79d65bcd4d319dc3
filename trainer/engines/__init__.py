"""How a step's gradients become an update: the native loop or DeepSpeed's engine.

Both present the same small interface to `train.train_step` and to the checkpoint code:

    out = engine.forward(inputs, targets, ...)         # the model's forward
    engine.backward(out.loss, micro_batches, last)     # once per micro-batch
    norm = engine.reduce_and_clip(max_norm)            # global norm (tensor), or None if the step measures it
    norm = engine.step(lr, norm, loss_is_finite)       # the update; returns the global gradient norm
    engine.optimizer_state() / engine.loaded(state)    # per-parameter AdamW state for checkpoints

so checkpoints hold the same entries whichever engine wrote them, and either engine resumes the other.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn

from ..config import Config
from ..dist import Layout
from ..grad_sync import GradSync


class NonFiniteError(RuntimeError):
    """The loss or gradient norm stopped being finite; the same on every rank."""


class Engine(Protocol):
    name: str
    model: nn.Module
    grad_sync: GradSync  # dense vs expert parameters (and the native reduction)

    def forward(self, *args, **kwargs): ...

    def backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None: ...

    def reduce_and_clip(self, max_norm: float) -> Optional[torch.Tensor]: ...

    def step(self, lr: float, norm: Optional[float], loss_is_finite: bool) -> float: ...

    def optimizer_state(self, for_loading: bool = False): ...

    def loaded(self, state) -> None: ...


def adamw(param_groups: list[dict], cfg: Config) -> torch.optim.AdamW:
    """The trainer's optimizer, whichever engine steps it (learning rate set per step)."""
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))


def adamw_param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Weight decay on matrices only; the same two groups for every engine."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": cfg.train.weight_decay, "name": "decay"},
            {"params": vectors, "weight_decay": 0.0, "name": "no_decay"}]


def build_engine(cfg: Config, model: nn.Module, layout: Layout) -> Engine:
    if cfg.train.engine == "deepspeed":
        from .deepspeed_zero import DeepSpeedZero

        return DeepSpeedZero(cfg, model, layout)
    from .native import NativeEngine

    return NativeEngine(cfg, model, layout)
