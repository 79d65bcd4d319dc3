"""The MoE layer sharded over 2 and 4 gloo processes equals one process holding every expert.

Each rank builds both the sharded layer and the one-process reference (all experts, all tokens)
from the same seed; the sharded objective is each rank's mean over its own tokens, so the global
objective is the mean over ranks, exactly what the trainer optimises. After the real gradient
sync, every parameter's gradient (router, every expert) and the input gradient must match.
"""

import pytest
import torch
import torch.distributed as dist

from trainer.config import ParallelConfig
from trainer.dist import init_distributed
from trainer.grad_sync import GradSync
from trainer.moe import MoE

from .distributed import run_processes

D, F, E, T_LOCAL = 16, 24, 8, 12
AUX_COEF, Z_COEF = 0.3, 0.2
TOL = dict(rtol=1e-5, atol=1e-6)


def objective(layer_out, upstream):
    return (layer_out.out * upstream).sum(-1).mean() + AUX_COEF * layer_out.aux_loss + Z_COEF * layer_out.z_loss


def build(ep_group, stats_group, top_k, capacity_factor, collapse):
    layer = MoE(D, F, E, top_k, capacity_factor, ep_group, stats_group, layer_id=3)
    layer.init_weights(seed=11)
    if collapse:  # every token's top choice is expert 0: other experts get zero rows
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0] = 1.0
    return layer


def _parity_worker(rank, world_size, ep):
    layout = init_distributed(ParallelConfig(ep=ep), torch.device("cpu"))
    W = world_size
    gen = torch.Generator().manual_seed(5)
    x_all = torch.randn(W * T_LOCAL, D, generator=gen)
    upstream_all = torch.randn(W * T_LOCAL, D, generator=gen)
    mine = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    scenarios = [(1, None, False), (2, None, False), (2, 100.0, False), (1, None, True)]
    for top_k, capacity_factor, collapse in scenarios:
        x_in = x_all.abs() if collapse else x_all
        ref = build(None, None, top_k, capacity_factor, collapse)
        shard = build(layout.ep_group, layout.world_group, top_k, capacity_factor, collapse)
        first = layout.ep_rank * (E // ep)
        local = slice(first, first + E // ep)

        # init does not depend on the layout
        for name in ("w1_LFD", "w3_LFD", "w2_LDF"):
            assert torch.equal(getattr(shard.experts, name), getattr(ref.experts, name)[local]), name

        x_ref = x_in.clone().requires_grad_()
        ref_out = ref(x_ref)
        ref_loss = objective(ref_out, upstream_all)
        ref_loss.backward()

        x_loc = x_in[mine].clone().requires_grad_()
        out = shard(x_loc)
        loss = objective(out, upstream_all[mine])
        loss.backward()
        sync = GradSync(shard, layout)
        sync.reduce()

        what = f"top_k={top_k} cf={capacity_factor} collapse={collapse} ep={ep} world={W}"
        torch.testing.assert_close(out.out, ref_out.out[mine], **TOL, msg=lambda m: f"{what}: output {m}")
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / W, ref_loss.detach(), **TOL)
        assert out.stats.routed_E.tolist() == ref_out.stats.routed_E.tolist(), what
        assert int(out.stats.dropped) == int(ref_out.stats.dropped) == 0, what
        torch.testing.assert_close(shard.router.weight.grad, ref.router.weight.grad, **TOL,
                                   msg=lambda m: f"{what}: router grad {m}")
        for name in ("w1_LFD", "w3_LFD", "w2_LDF"):
            grad = getattr(shard.experts, name).grad
            assert grad is not None, f"{what}: {name} has no gradient"
            torch.testing.assert_close(grad, getattr(ref.experts, name).grad[local], **TOL,
                                       msg=lambda m: f"{what}: {name} grad {m}")
        # the input's share of the global objective is 1/W of its rank's objective
        torch.testing.assert_close(x_loc.grad / W, x_ref.grad[mine], **TOL, msg=lambda m: f"{what}: input grad {m}")
        # and the clipping norm is the one-process norm, on every rank
        ref_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).double().norm()
        torch.testing.assert_close(sync.global_norm(), ref_norm, rtol=1e-5, atol=1e-7)
        if collapse:
            idle = [p.grad for p in shard.experts.parameters()]
            assert all(g is not None for g in idle)


@pytest.mark.parametrize("world_size, ep", [(2, 2), (4, 4), (4, 2)])
def test_sharded_layer_matches_one_process(world_size, ep):
    run_processes(_parity_worker, world_size, ep)
