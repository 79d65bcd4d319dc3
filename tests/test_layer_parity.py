"""The MoE layer sharded over 2 and 4 gloo processes equals one process holding every expert.

Each rank builds both the sharded layer and the one-process reference (all experts, all tokens)
from the same seed; the sharded objective is each rank's mean over its own tokens, so the global
objective is the mean over ranks, exactly what the trainer optimises. After the real gradient
sync, every parameter's gradient (router, every expert) and the input gradient must match.

Scenarios include padding that differs per rank (so ranks hold different numbers of valid
tokens), collapsed routing (experts, even whole ranks, with zero rows) and bf16 autocast.
"""

import pytest
import torch
import torch.distributed as dist

from trainer.config import ParallelConfig
from trainer.moe import MoE
from trainer.parallel.dist import make_layout
from trainer.parallel.grad_sync import GradSync

from .distributed import run_processes

D, F, E, T_LOCAL = 16, 24, 8, 12
AUX_COEF, Z_COEF = 0.3, 0.2
TOL = dict(rtol=1e-5, atol=1e-6)
BF16_TOL = dict(rtol=2e-2, atol=2e-3)


def objective(layer_out, upstream):
    return (layer_out.out * upstream).sum(-1).mean() + AUX_COEF * layer_out.aux_loss + Z_COEF * layer_out.z_loss


def build(ep_group, stats_group, top_k, capacity_factor, collapse, **router_options):
    # built whole, then sharded, as the trainer's parallelize does
    layer = MoE(D, F, E, top_k, capacity_factor, layer_id=3, **router_options)
    if ep_group is not None or stats_group is not None:
        layer.apply_expert_parallel(ep_group, stats_group)
    layer.init_weights(seed=11)
    if collapse:  # every token's top choice is expert 0: other experts get zero rows
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0] = 1.0
    return layer


def _parity_worker(rank, world_size, ep):
    layout = make_layout(ParallelConfig(ep=ep), torch.device("cpu"))
    W = world_size
    gen = torch.Generator().manual_seed(5)
    x_all = torch.randn(W * T_LOCAL, D, generator=gen)
    upstream_all = torch.randn(W * T_LOCAL, D, generator=gen)
    mine = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    # rank r pads its last 3r + 1 tokens: every rank holds a different number of valid tokens
    valid_all = torch.cat([torch.arange(T_LOCAL) < T_LOCAL - 3 * r - 1 for r in range(W)])
    sigmoid = {"score_func": "sigmoid", "route_scale": 2.5}
    scenarios = [  # (top_k, capacity_factor, collapse, padded, bf16, router options)
        (1, None, False, False, False, {}), (2, None, False, False, False, {}), (2, 100.0, False, False, False, {}),
        (1, None, True, False, False, {}), (2, None, False, True, False, {}), (2, 100.0, False, True, False, {}),
        (2, None, False, False, True, {}), (3, None, False, True, False, sigmoid),
        (2, None, False, True, False, {"num_shared_experts": 2}),  # computed while the all_to_all is in flight
        (2, None, False, True, False, {"num_shared_experts": 2, "overlap_shared_experts": False}),
        (3, None, False, True, False, {"n_groups": 4, "topk_groups": 2, "expert_bias": True}),
        (2, None, False, False, False, {"router_jitter": 0.2, "noisy_topk": True}),
        (2, None, False, True, False, {"expert_impl": "grouped_mm"}),  # one block per expert, however many ranks fill it
    ]
    # each scenario with the received rows as they arrive (blocks per source rank) and regrouped
    scenarios = [(*sc, regroup_below) for sc in scenarios for regroup_below in (0, 10**9)]
    for top_k, capacity_factor, collapse, padded, bf16, options, regroup_below in scenarios:
        tol = BF16_TOL if bf16 else TOL
        x_in = x_all.abs() if collapse else x_all
        valid_ref, valid_loc = (valid_all, valid_all[mine]) if padded else (None, None)
        ref = build(None, None, top_k, capacity_factor, collapse, **options)
        shard = build(layout.ep_group, layout.world_group, top_k, capacity_factor, collapse, **options)
        shard.dispatcher.regroup_below_rows = regroup_below
        first = layout.ep_rank * (E // ep)
        local = slice(first, first + E // ep)

        # init does not depend on the layout
        for name in ("w1_LFD", "w3_LFD", "w2_LDF"):
            assert torch.equal(getattr(shard.experts, name), getattr(ref.experts, name)[local]), name

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        x_ref = x_in.clone().requires_grad_()
        with autocast:
            ref_out = ref(x_ref, valid_ref)
        ref_loss = objective(ref_out, upstream_all)
        ref_loss.backward()

        x_loc = x_in[mine].clone().requires_grad_()
        with autocast:
            out = shard(x_loc, valid_loc)
        loss = objective(out, upstream_all[mine])
        loss.backward()
        what = (f"top_k={top_k} cf={capacity_factor} collapse={collapse} padded={padded} bf16={bf16} {options} "
                f"regroup_below={regroup_below} ep={ep} world={W}")
        # every local expert ran, even on zero rows: its gradient is zeros, never None
        for name, p in shard.experts.named_parameters():
            assert p.grad is not None, f"{what}: {name} has no gradient before the sync"
        sync = GradSync(shard, layout)
        sync.reduce()

        torch.testing.assert_close(out.out, ref_out.out[mine], **tol, msg=lambda m: f"{what}: output {m}")
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / W, ref_loss.detach(), **tol)
        assert out.stats.routed_E.tolist() == ref_out.stats.routed_E.tolist(), what
        assert int(out.stats.dropped) == int(ref_out.stats.dropped) == 0, what
        torch.testing.assert_close(shard.router.weight.grad, ref.router.weight.grad, **tol,
                                   msg=lambda m: f"{what}: router grad {m}")
        for name in ("w1_LFD", "w3_LFD", "w2_LDF"):
            grad = getattr(shard.experts, name).grad
            torch.testing.assert_close(grad, getattr(ref.experts, name).grad[local], **tol,
                                       msg=lambda m: f"{what}: {name} grad {m}")
        if shard.shared_experts is not None:  # dense: averaged over the world like any replicated weight
            for name, p in shard.shared_experts.named_parameters():
                torch.testing.assert_close(p.grad, getattr(ref.shared_experts, name).grad, **tol,
                                           msg=lambda m: f"{what}: shared {name} grad {m}")
        # the input's share of the global objective is 1/W of its rank's objective
        torch.testing.assert_close(x_loc.grad / W, x_ref.grad[mine], **tol, msg=lambda m: f"{what}: input grad {m}")
        # and the clipping norm is the one-process norm, on every rank
        ref_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).double().norm()
        torch.testing.assert_close(sync.global_norm(), ref_norm, rtol=tol["rtol"], atol=1e-7)


@pytest.mark.parametrize("world_size, ep", [(2, 2), (4, 4), (4, 2)])
def test_sharded_layer_matches_one_process(world_size, ep):
    run_processes(_parity_worker, world_size, ep)
