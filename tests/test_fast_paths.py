"""Every fast path of the MoE layer equals the plain computation, outputs and every gradient:
sorted dispatch without `nonzero`, index_select / index_copy regrouping, grouped GEMM and the
expert loop, in fp32 and bf16, at E = 8, 64 and 256, with experts that receive no rows.

The plain path runs every expert on every token and weighs the results with the router's
combine weights (zero for experts a token did not choose or was dropped from): no sorting,
no dispatch, no grouping."""

import copy

import pytest
import torch
import torch.nn.functional as F

from trainer.moe import MoE
from trainer.tools.stage_timing import StageClock, staged_forward_backward

D, F_DIM, T, K = 32, 64, 96, 2
AUX, Z = 0.01, 0.001


def make_layer(num_experts: int, impl: str, capacity_factor=None) -> MoE:
    layer = MoE(D, F_DIM, num_experts, K, capacity_factor=capacity_factor, expert_impl=impl, expert_bias=True)
    layer.init_weights(seed=5)
    with torch.no_grad():  # expert 3 is never chosen: its rows are zero on every path
        layer.router.expert_bias_E[3] = -1e4
    return layer


def plain_forward(layer: MoE, x_TD: torch.Tensor, dtype) -> torch.Tensor:
    routing = layer.router(x_TD)
    E = layer.router.num_experts
    gate_TE = torch.zeros(x_TD.shape[0], E).scatter_add(
        1, routing.expert_idx_TK, routing.weight_TK * routing.keep_TK.float())
    x = x_TD.to(dtype)
    w1, w3, w2 = (w.to(dtype) for w in (layer.experts.w1_LFD, layer.experts.w3_LFD, layer.experts.w2_LDF))
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
    for e in range(E):
        y_TD = (F.silu(x @ w1[e].t()) * (x @ w3[e].t())) @ w2[e].t()
        out_TD = out_TD + gate_TE[:, e:e + 1] * y_TD.float()
    from trainer.moe.router import RoutingCounts, balance_losses

    aux, z = balance_losses(routing, RoutingCounts.split(routing.local_counts), 1, K)
    return out_TD, AUX * aux + Z * z


def grads_of(layer: MoE, x_TD: torch.Tensor, run) -> tuple[torch.Tensor, dict]:
    x = x_TD.clone().requires_grad_()
    out_TD, extra = run(x)
    g = torch.linspace(-1, 1, out_TD.numel()).view_as(out_TD)
    ((out_TD * g).sum() + extra).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out_TD.detach(), {"x": x.grad.clone(), **grads}


@pytest.mark.parametrize("num_experts", [8, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_layer_equals_the_plain_path(num_experts, dtype, impl, capacity_factor):
    layer = make_layer(num_experts, impl, capacity_factor)
    plain = copy.deepcopy(layer)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(num_experts))

    def fast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = layer(x)
        return out.out.float(), AUX * out.aux_loss + Z * out.z_loss

    out, grads = grads_of(layer, x_TD, fast)
    ref_out, ref_grads = grads_of(plain, x_TD, lambda x: plain_forward(plain, x, dtype))
    def tol(ref):  # bf16: rounding differs with the order of the sums, so relative to the tensor's scale
        if dtype == torch.float32:
            return dict(rtol=1e-5, atol=1e-6)
        return dict(rtol=2e-2, atol=2e-2 * float(ref.abs().max()))

    torch.testing.assert_close(out, ref_out, **tol(ref_out))
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol(ref_grads[name]),
                                   msg=lambda m: f"{name}: {m}")
    # expert 3 saw no rows: its gradient is exactly zero (and exists)
    for name in ("experts.w1_LFD", "experts.w3_LFD", "experts.w2_LDF"):
        assert torch.count_nonzero(grads[name][3]) == 0
    if capacity_factor is not None:
        assert layer.router(x_TD).keep_TK.logical_not().any(), "the capacity case should drop some routes"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_stage_timing_runs_the_same_computation_as_the_layer(dtype, capacity_factor):
    """The benchmark's per-stage split times the layer's own work: same output, same gradients."""
    layer = make_layer(8, "auto", capacity_factor)
    staged = copy.deepcopy(layer)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    g_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    x = x_TD.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        out = layer(x)
    ((out.out.float() * g_TD).sum() + AUX * out.aux_loss + Z * out.z_loss).backward()
    clock = StageClock(torch.device("cpu"))
    staged_out, staged_grad_x, rows = staged_forward_backward(staged, x_TD, g_TD, AUX, Z, clock, dtype)
    assert torch.equal(staged_out, out.out.float())
    assert torch.equal(staged_grad_x, x.grad)
    for (name, p), q in zip(layer.named_parameters(), staged.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert rows == int(layer.router(x_TD).keep_TK.sum())
    assert set(clock.ms) == {"router", "permute", "all_to_all", "experts", "combine"}
