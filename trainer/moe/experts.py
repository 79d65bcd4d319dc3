"""The experts this rank owns, as stacked SwiGLU weights.

Shape legend: L local experts, D model dim, F expert hidden dim, X rows received for the
local experts (grouped by expert, `tokens_per_expert[l]` rows each).

Every local expert runs on every call, also on zero rows, so each expert weight gets a
gradient of zeros rather than None and the optimizer treats all experts alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .router import derived_seed

EXPERT_PARAM_ATTR = "is_expert"  # set on expert parameters; gradient sync and clipping read it


def is_expert_param(param: nn.Parameter) -> bool:
    return getattr(param, EXPERT_PARAM_ATTR, False)


def grouped_mm_available(x: torch.Tensor) -> bool:
    """torch's grouped GEMM kernels need CUDA with bf16 (its CPU backward is not usable)."""
    return hasattr(F, "grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16


class Experts(nn.Module):
    def __init__(self, num_local_experts: int, d_model: int, d_ff: int, first_expert_id: int = 0, impl: str = "auto"):
        super().__init__()
        if impl not in ("auto", "loop", "grouped_mm"):
            raise ValueError(f"expert impl must be auto | loop | grouped_mm, got {impl!r}")
        self.num_local_experts, self.first_expert_id, self.impl = num_local_experts, first_expert_id, impl
        L, D, F_ = num_local_experts, d_model, d_ff
        self.w1_LFD = nn.Parameter(torch.empty(L, F_, D))  # gate projection
        self.w3_LFD = nn.Parameter(torch.empty(L, F_, D))  # up projection
        self.w2_LDF = nn.Parameter(torch.empty(L, D, F_))  # down projection
        for p in self.parameters():
            setattr(p, EXPERT_PARAM_ATTR, True)

    def forward(self, x_XD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        use_grouped = self.impl == "grouped_mm" or (self.impl == "auto" and grouped_mm_available(x_XD))
        if use_grouped:
            return self._forward_grouped(x_XD, tokens_per_expert)
        return self._forward_loop(x_XD, tokens_per_expert)

    def _forward_loop(self, x_XD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        w1, w3, w2 = (w.to(x_XD.dtype) for w in (self.w1_LFD, self.w3_LFD, self.w2_LDF))
        outputs = []
        for local, x_xD in enumerate(torch.split(x_XD, tokens_per_expert)):
            h_xF = F.silu(x_xD @ w1[local].t()) * (x_xD @ w3[local].t())
            outputs.append(h_xF @ w2[local].t())
        return torch.cat(outputs)

    def _forward_grouped(self, x_XD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        offs_L = torch.tensor(tokens_per_expert, device=x_XD.device).cumsum(0).to(torch.int32)
        w1, w3, w2 = (w.to(x_XD.dtype) for w in (self.w1_LFD, self.w3_LFD, self.w2_LDF))
        gate_XF = F.grouped_mm(x_XD, w1.transpose(-2, -1), offs=offs_L)
        up_XF = F.grouped_mm(x_XD, w3.transpose(-2, -1), offs=offs_L)
        return F.grouped_mm(F.silu(gate_XF) * up_XF, w2.transpose(-2, -1), offs=offs_L)

    def init_weights(self, seed: int, layer_id: int, std: float, out_std: float) -> None:
        """Expert e of layer l is drawn from a generator seeded by (seed, l, e): layout-independent."""
        with torch.no_grad():
            for local in range(self.num_local_experts):
                expert = self.first_expert_id + local
                gen = torch.Generator().manual_seed(derived_seed(seed, layer_id, "expert", expert))
                for w, s in ((self.w1_LFD, std), (self.w3_LFD, std), (self.w2_LDF, out_std)):
                    w[local].copy_(torch.randn(w.shape[1:], generator=gen) * s)


def default_init_std(d_model: int, n_layers: int) -> tuple[float, float]:
    """(std for input projections, std for projections into the residual stream)."""
    std = 1.0 / math.sqrt(d_model)
    return std, std / math.sqrt(2 * n_layers)
