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
from .expert_loop import ExpertLoopSwiGLU, row_blocks_of

EXPERT_IMPLS = ("auto", "loop", "grouped_mm")
GROUPED_MM_ALIGN_BYTES = 16  # torch's grouped GEMM wants 16-byte aligned rows


def grouped_mm_problem(device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int) -> str | None:
    """Why torch's grouped GEMM cannot run here, or None when it can (CUDA: bf16; CPU: fp32 or bf16)."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if device.type not in ("cuda", "cpu"):
        return f"it runs on CUDA or CPU, got {device.type}"
    allowed = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    if dtype not in allowed:
        return f"on {device.type} it needs {' or '.join(str(d) for d in allowed)}, got {dtype}"
    elem = torch.empty((), dtype=dtype).element_size()
    for name, dim in (("model.d_model", d_model), ("moe.d_ff", d_ff)):
        if (dim * elem) % GROUPED_MM_ALIGN_BYTES:
            return f"{name}={dim} rows are not {GROUPED_MM_ALIGN_BYTES}-byte aligned in {dtype}"
    return None


def expert_impl_used(impl: str, device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int) -> str:
    """The implementation `impl` resolves to for these inputs ("loop" or "grouped_mm").

    `auto`: grouped GEMM on CUDA where it can run; the loop elsewhere. On CPU, torch's grouped
    GEMM is itself a loop of matmuls and measured no faster than ours (`python -m trainer bench
    --impl grouped_mm`)."""
    if impl == "auto":
        usable = device.type == "cuda" and grouped_mm_problem(device, dtype, d_model, d_ff) is None
        return "grouped_mm" if usable else "loop"
    return impl


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    rejects the stride-0 gradient of, e.g., `out.sum().backward()`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


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

    def impl_used(self, device: torch.device, dtype: torch.dtype) -> str:
        """"loop" or "grouped_mm": what runs on rows of this device and dtype (autocast's, if on)."""
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        return expert_impl_used(self.impl, device, dtype, self.w1_LFD.shape[2], self.w1_LFD.shape[1])

    def takes_row_blocks(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether rows may come in several blocks per expert (the loop), not one per expert."""
        return self.impl_used(device, dtype) == "loop"

    def forward(self, x_XD: torch.Tensor, tokens_per_expert: list[int],
                row_blocks: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """Rows grouped by expert (`tokens_per_expert[l]` rows each), or, for experts that
        `takes_row_blocks`, in any `row_blocks` (local expert, first row, end row) covering them."""
        D, F_ = x_XD.shape[1], self.w1_LFD.shape[1]
        if torch.is_autocast_enabled(x_XD.device.type):  # experts run in the autocast dtype
            x_XD = x_XD.to(torch.get_autocast_dtype(x_XD.device.type))
        if self.impl == "grouped_mm":
            problem = grouped_mm_problem(x_XD.device, x_XD.dtype, D, F_)
            if problem:
                raise RuntimeError(f"moe.expert_impl=grouped_mm: {problem}")
        if self.impl_used(x_XD.device, x_XD.dtype) == "grouped_mm":
            if row_blocks is not None and row_blocks != row_blocks_of(tokens_per_expert):
                raise ValueError("grouped_mm experts need their rows grouped by expert, one block each")
            return self._forward_grouped(x_XD, tokens_per_expert)
        blocks = row_blocks if row_blocks is not None else row_blocks_of(tokens_per_expert)
        return ExpertLoopSwiGLU.apply(x_XD, self.w1_LFD, self.w3_LFD, self.w2_LDF, blocks)

    def _forward_grouped(self, x_XD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        # the counts are on the host already: build the offsets there, one host-to-device copy
        offs_L = torch.tensor(tokens_per_expert, dtype=torch.int64).cumsum(0).to(device=x_XD.device, dtype=torch.int32)
        w1, w3, w2 = (w.to(x_XD.dtype) for w in (self.w1_LFD, self.w3_LFD, self.w2_LDF))
        gate_XF = F.grouped_mm(x_XD, w1.transpose(-2, -1), offs=offs_L)
        up_XF = F.grouped_mm(x_XD, w3.transpose(-2, -1), offs=offs_L)
        out_XD = F.grouped_mm(F.silu(gate_XF) * up_XF, w2.transpose(-2, -1), offs=offs_L)
        return _ContiguousGrad.apply(out_XD)

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
