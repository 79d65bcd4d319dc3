"""Experts: sharding keeps values and global ids; grouped GEMM is validated, `auto` falls back;
(CPU equality with the loop: tests/test_fast_paths.py); on CUDA, the loop and grouped GEMM agree under bf16 (skipped without a GPU)."""

import pytest
import torch

from trainer.moe import MoE
from trainer.moe.experts import Experts, expert_impl_used, grouped_mm_problem


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


def test_grouped_mm_problems_are_named_and_auto_falls_back():
    assert grouped_mm_problem(torch.device("cpu"), torch.float32, 64, 64) is None  # runs on CPU if asked for
    assert expert_impl_used("auto", torch.device("cpu"), torch.float32, 64, 64) == "loop"
    assert expert_impl_used("auto", torch.device("cuda"), torch.bfloat16, 64, 64) == "grouped_mm"
    assert "bf16" in grouped_mm_problem(torch.device("cuda"), torch.float32, 64, 64).replace("bfloat16", "bf16")
    assert "moe.d_ff=30" in grouped_mm_problem(torch.device("cpu"), torch.bfloat16, 64, 30)
    layer = MoE(16, 30, 4, top_k=2, expert_impl="auto")  # 30 bf16 = 60 bytes: unaligned, auto loops
    layer.init_weights(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(12, 16))
    assert out.out.shape == (12, 16) and torch.isfinite(out.out).all()
    forced = MoE(16, 30, 4, top_k=2, expert_impl="grouped_mm")
    forced.init_weights(0)
    with pytest.raises(RuntimeError, match="moe.expert_impl=grouped_mm: moe.d_ff=30 rows are not 16-byte aligned"):
        forced(torch.randn(12, 16))


def test_grouped_mm_takes_a_stride_zero_gradient():
    experts = Experts(4, 16, 32, impl="grouped_mm")
    experts.init_weights(seed=0, layer_id=0, std=0.1, out_std=0.1)
    experts(torch.randn(12, 16), [5, 0, 4, 3]).sum().backward()  # .sum(): an expanded (stride-0) gradient
    assert experts.w1_LFD.grad.abs().sum() > 0


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
