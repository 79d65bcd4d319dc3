"""The experts this rank owns, as stacked SwiGLU weights.

Shape legend: L local experts, D model dim, F expert hidden dim, X rows received for the
local experts (grouped by expert, `tokens_per_expert[l]` rows each).

Every local expert runs on every call, also on zero rows, so each expert weight gets a
gradient of zeros rather than None and the optimizer treats all experts alike.

Expert parameters are recognised by the module that holds them (`Experts`), so the mark
survives `copy.deepcopy`, meta-device construction and `to_empty`; see `expert_parameters`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..seeding import derived_seed

EXPERT_IMPLS = ("auto", "loop", "grouped_mm")
GROUPED_MM_ALIGN_BYTES = 16  # torch's grouped GEMM wants 16-byte aligned rows


def grouped_mm_problem(device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int) -> str | None:
    """Why torch's grouped GEMM cannot run here, or None when it can."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if device.type != "cuda":
        return f"it needs a CUDA device (its CPU backward is not usable), got {device.type}"
    if dtype != torch.bfloat16:
        return f"it needs bf16 (train.dtype=bf16), got {dtype}"
    elem = torch.empty((), dtype=dtype).element_size()
    for name, dim in (("model.d_model", d_model), ("moe.d_ff", d_ff)):
        if (dim * elem) % GROUPED_MM_ALIGN_BYTES:
            return f"{name}={dim} rows are not {GROUPED_MM_ALIGN_BYTES}-byte aligned in {dtype}"
    return None


class Experts(nn.Module):
    """Experts [first_expert_id, first_expert_id + num_local_experts) of one MoE layer."""

    def __init__(self, num_local_experts: int, d_model: int, d_ff: int, first_expert_id: int = 0, impl: str = "auto"):
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert impl must be {' | '.join(EXPERT_IMPLS)}, got {impl!r}")
        self.num_local_experts, self.first_expert_id, self.impl = num_local_experts, first_expert_id, impl
        L, D, F_ = num_local_experts, d_model, d_ff
        self.w1_LFD = nn.Parameter(torch.empty(L, F_, D))  # gate projection
        self.w3_LFD = nn.Parameter(torch.empty(L, F_, D))  # up projection
        self.w2_LDF = nn.Parameter(torch.empty(L, D, F_))  # down projection

    @property
    def global_expert_ids(self) -> range:
        return range(self.first_expert_id, self.first_expert_id + self.num_local_experts)

    def local_slice(self, first_expert_id: int, num_local_experts: int) -> "Experts":
        """A new module holding only experts [first, first + num) of these (on the same device)."""
        D, F_ = self.w1_LFD.shape[2], self.w1_LFD.shape[1]
        device = self.w1_LFD.device
        with torch.device(device):
            part = Experts(num_local_experts, D, F_, first_expert_id, self.impl)
        if device.type != "meta":
            rows = slice(first_expert_id - self.first_expert_id, first_expert_id - self.first_expert_id + num_local_experts)
            with torch.no_grad():
                for name, w in part.named_parameters():
                    w.copy_(getattr(self, name)[rows])
        return part

    def forward(self, x_XD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        if self.impl == "grouped_mm":
            problem = grouped_mm_problem(x_XD.device, x_XD.dtype, x_XD.shape[1], self.w1_LFD.shape[1])
            if problem:
                raise RuntimeError(f"moe.expert_impl=grouped_mm: {problem}")
            return self._forward_grouped(x_XD, tokens_per_expert)
        if self.impl == "auto" and grouped_mm_problem(x_XD.device, x_XD.dtype, x_XD.shape[1], self.w1_LFD.shape[1]) is None:
            return self._forward_grouped(x_XD, tokens_per_expert)
        return self._forward_loop(x_XD, tokens_per_expert)

    def _forward_loop(self, x_XD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        # unbind, not w[local]: the backward of L selects would zero-fill L full [L, F, D]
        # gradients (quadratic in L); unbind's backward stacks the L pieces once.
        weights = (w.to(x_XD.dtype).unbind(0) for w in (self.w1_LFD, self.w3_LFD, self.w2_LDF))
        outputs = []
        for x_xD, w1_FD, w3_FD, w2_DF in zip(torch.split(x_XD, tokens_per_expert), *weights):
            h_xF = F.silu(x_xD @ w1_FD.t()) * (x_xD @ w3_FD.t())
            outputs.append(h_xF @ w2_DF.t())
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
            for local, expert in enumerate(self.global_expert_ids):
                gen = torch.Generator().manual_seed(derived_seed(seed, layer_id, "expert", expert))
                for w, s in ((self.w1_LFD, std), (self.w3_LFD, std), (self.w2_LDF, out_std)):
                    w[local].copy_(torch.randn(w.shape[1:], generator=gen) * s)


class SharedExperts(nn.Module):
    """`num_shared` always-on SwiGLU experts beside the routed ones (DeepSeek-MoE), fused into one
    SwiGLU of hidden size num_shared * d_ff. Dense: replicated on every rank, averaged over the
    world like any dense parameter (it is not an `Experts` module)."""

    def __init__(self, num_shared: int, d_model: int, d_ff: int):
        super().__init__()
        H = num_shared * d_ff
        self.w1_HD = nn.Parameter(torch.empty(H, d_model))
        self.w3_HD = nn.Parameter(torch.empty(H, d_model))
        self.w2_DH = nn.Parameter(torch.empty(d_model, H))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = (w.to(x_TD.dtype) for w in (self.w1_HD, self.w3_HD, self.w2_DH))
        return (F.silu(x_TD @ w1.t()) * (x_TD @ w3.t())) @ w2.t()

    def init_weights(self, seed: int, layer_id: int, std: float, out_std: float) -> None:
        gen = torch.Generator().manual_seed(derived_seed(seed, layer_id, "shared experts"))
        with torch.no_grad():
            for w, s in ((self.w1_HD, std), (self.w3_HD, std), (self.w2_DH, out_std)):
                w.copy_(torch.randn(w.shape, generator=gen) * s)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters held by `Experts` modules anywhere in `model`: sharded, never averaged over the world."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, Experts):
            for p in module.parameters():
                seen[id(p)] = p
    return list(seen.values())


def default_init_std(d_model: int, n_layers: int) -> tuple[float, float]:
    """(std for input projections, std for projections into the residual stream)."""
    std = 1.0 / math.sqrt(d_model)
    return std, std / math.sqrt(2 * n_layers)
