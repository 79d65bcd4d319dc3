"""Experts: sharding keeps values and global ids; grouped GEMM is validated, `auto` falls back;
on CUDA, the loop and grouped GEMM agree under bf16 (skipped without a GPU)."""

import pytest
import torch

from trainer.moe import MoE
from trainer.moe.experts import Experts, grouped_mm_problem


def test_local_slice_keeps_values_and_global_ids():
    whole = Experts(8, 16, 24)
    whole.init_weights(seed=3, layer_id=1, std=0.1, out_std=0.05)
    part = whole.local_slice(4, 4)
    assert list(part.global_expert_ids) == [4, 5, 6, 7]
    for name in ("w1_LFD", "w3_LFD", "w2_LDF"):
        assert torch.equal(getattr(part, name), getattr(whole, name)[4:])
    # and initialising the slice alone gives the same numbers: init is keyed by global id
    fresh = Experts(4, 16, 24, first_expert_id=4)
    fresh.init_weights(seed=3, layer_id=1, std=0.1, out_std=0.05)
    assert torch.equal(fresh.w1_LFD, part.w1_LFD)


def test_grouped_mm_problems_are_named_and_auto_falls_back_on_cpu():
    assert "CUDA" in grouped_mm_problem(torch.device("cpu"), torch.bfloat16, 64, 64)
    layer = MoE(16, 32, 4, top_k=2, expert_impl="auto")
    layer.init_weights(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(12, 16))
    assert out.out.shape == (12, 16) and torch.isfinite(out.out).all()
    forced = MoE(16, 32, 4, top_k=2, expert_impl="grouped_mm")
    forced.init_weights(0)
    with pytest.raises(RuntimeError, match="moe.expert_impl=grouped_mm: it needs a CUDA device"):
        forced(torch.randn(12, 16))


@pytest.mark.skipif(not torch.cuda.is_available() or grouped_mm_problem(
    torch.device("cuda"), torch.bfloat16, 256, 512) is not None, reason="needs CUDA with torch grouped GEMM")
def test_loop_and_grouped_mm_agree_under_bf16_on_cuda():
    torch.manual_seed(0)
    layers = {impl: MoE(256, 512, 8, top_k=2, expert_impl=impl).cuda() for impl in ("loop", "grouped_mm")}
    for layer in layers.values():
        layer.init_weights(0)
    x = torch.randn(1024, 256, device="cuda")
    results = {}
    for impl, layer in layers.items():
        x_in = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x_in)
        out.out.float().square().mean().backward()
        results[impl] = (out.out.float(), x_in.grad, layer.experts.w1_LFD.grad)
    for a, b in zip(results["loop"], results["grouped_mm"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
