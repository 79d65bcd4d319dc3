"""`train.compile`: `torch.compile` (inductor) of the parts of every block whose work is fixed by
the config: the norms, attention, and the dense and shared-expert FFNs.

What stays eager is the MoE layer's routing and everything that depends on the routing's data:
the router, the count exchange and the host copy of the splits, the all_to_alls, the expert loop
(one matmul per block of rows, sized by the counts) and the combine's scatter. The router stays
eager because an activation-checkpointing recompute calls it with the forward's choices (no
top-k): compiled, that is another graph that saves other tensors for backward, which
checkpointing refuses; compiled, it also measured no faster. Each compiled module keeps its
parameter names (`nn.Module.compile`), so checkpoints, the optimizer's groups, activation
checkpointing and FSDP see the same model.

Inductor needs a C++ compiler on CPU and Triton on CUDA; `compile_problem` says which is missing,
so that preflight refuses `train.compile=true` in one line instead of a traceback mid-step.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..model import Attention, DenseFFN
from ..moe.experts import SharedExperts

COMPILED_MODULES = (nn.RMSNorm, Attention, DenseFFN, SharedExperts)


def compile_problem(device_type: str) -> Optional[str]:
    """Why inductor cannot compile for this device type here, or None when it can."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor needs Triton on CUDA and it is not installed"
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # inductor raises its own InvalidCxxCompiler, or a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"inductor needs a C++ compiler on CPU and found none ({first[:160]}); install g++ or set CXX"
    return None


def compiled_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, COMPILED_MODULES)]


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile every module of `COMPILED_MODULES` in `model` in place; returns `model`."""
    for module in compiled_modules(model):
        module.compile()
    return model
