"""Build layer: what a config makes, shared by the loop, interop and the tools.

The model from a config (on the meta device with no process groups, then parallelized and
materialised), the trainer around it (model and engine), evaluation, the learning-rate
schedule, autocast, and the peak FLOP/s that MFU is measured against.

Imports: `engines`, `run`, `parallel` and the layers below; never the loop, interop or a tool.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .config import Config
from .data import TokenBatches
from .engines import Engine, build_engine
from .model import Transformer
from .moe.collectives import all_reduce_sum_
from .parallel.activation_checkpointing import apply_activation_checkpointing
from .parallel.compile import apply_compile
from .parallel.dist import Layout
from .parallel.grad_sync import GradSync, split_dense_expert
from .parallel.parallelize import parallelize
from .run.agreement import check_replicas_identical

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU


def spec_peak_bf16_flops(device: torch.device) -> Optional[float]:
    """The spec sheet's dense bf16 FLOP/s of this GPU, if it is one we know; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to train.lr, then cosine decay to train.lr * train.min_lr_ratio (step from 0)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def autocast_context(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_model_on_meta(cfg: Config) -> Transformer:
    """Every expert, no storage, no groups: what the config describes, for shape checks."""
    with torch.device("meta"):
        return Transformer(cfg.model, cfg.moe)


def build_model(cfg: Config, layout: Layout) -> Transformer:
    """Built on the meta device with no process groups, then sharded, materialised and initialised."""
    return parallelize(full_model_on_meta(cfg), layout, cfg.train.seed, cfg.parallel.debug_splits)


@dataclass
class Trainer:
    """What a step needs; built once by `build_trainer`."""

    cfg: Config
    layout: Layout
    model: Transformer
    engine: Engine  # native (GradSync + AdamW) or DeepSpeed: backward, gradient reduction, update

    @property
    def grad_sync(self) -> GradSync:
        return self.engine.grad_sync


def build_trainer(cfg: Config, layout: Layout) -> Trainer:
    """The model (with `train.activation_checkpointing` and `train.compile` applied, before an
    engine wraps or shards it) and its engine."""
    model = apply_activation_checkpointing(build_model(cfg, layout), cfg.train.activation_checkpointing)
    if cfg.train.compile:  # inside checkpointed regions (their hooks stay eager), before FSDP's units
        apply_compile(model)
    # before an engine shards anything: replicas are whole tensors here, under every engine
    check_replicas_identical(model, split_dense_expert(model)[1], layout.world_group, layout.expert_dp_group)
    engine = build_engine(cfg, model, layout)
    return Trainer(cfg, layout, model, engine)


def eval_batch_count(cfg: Config, batches: TokenBatches) -> int:
    """`train.eval_batches`, or for 0 every window of the split once (at least one batch)."""
    return cfg.train.eval_batches or max(1, batches.num_windows // batches.global_batch)


@torch.no_grad()
def evaluate(model: Transformer, cfg: Config, layout: Layout, batches: TokenBatches) -> float:
    """LM loss over `eval_batch_count` global validation batches, weighted by token; every rank takes part."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=layout.device)  # summed cross-entropy, scored tokens
    for index in range(eval_batch_count(cfg, batches)):
        inputs, targets = (t.to(layout.device) for t in batches.batch(index))
        with autocast_context(cfg, layout.device):
            ce_sum = model(inputs, targets, lm_tokens=1.0).lm_loss
        sums += torch.stack([ce_sum.double(), (targets != -100).sum().double()])
    model.train()
    all_reduce_sum_(sums, layout.world_group, "evaluation", "all_reduce of validation losses")
    return (sums[0] / sums[1].clamp(min=1)).item()
