"""Activation checkpointing (`train.activation_checkpointing`): keep less for backward, recompute it.

    none   everything the backward needs is kept (default)
    full   each transformer block keeps only its input; the whole block is recomputed in backward
    moe    each MoE feed-forward keeps only its input; attention and dense blocks keep theirs

torch's composable `checkpoint` (non-reentrant, hooks on the module) keeps every parameter's name,
so checkpoints, the optimizer's groups and FSDP's units see the same model. Its `context_fn` gives
each checkpointed call a routing tape (`trainer.moe.recompute`): the recompute routes exactly as the
forward did and neither counts nor exchanges counts again. Early stop is off, so every rank re-runs
the whole region and issues the region's all_to_alls in the same order, whatever it needs back.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from ..moe import MoE
from ..moe.recompute import checkpoint_contexts

MODES = ("none", "full", "moe")


def checkpointed_modules(model: nn.Module, mode: str) -> list[nn.Module]:
    """The modules `mode` recomputes: the blocks (`full`), the MoE layers (`moe`), or none."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {MODES}, got {mode!r}")
    if mode == "full":
        return list(model.blocks)
    if mode == "moe":
        return [m for m in model.modules() if isinstance(m, MoE)]
    return []


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint the modules of `mode` in place (before FSDP wraps the blocks); returns `model`."""
    for module in checkpointed_modules(model, mode):
        checkpoint(module, context_fn=checkpoint_contexts, early_stop=False)
    return model
