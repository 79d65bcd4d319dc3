"""Dispatch on real gloo processes: rows reach the right experts and come back, forward and backward.

One spawn of 4 processes covers EP groups of 1, 2 and 4, uneven token counts per rank, dropped
routes, and experts that receive no token at all.
"""

import datetime

import pytest
import torch
import torch.distributed as dist

from trainer.moe.collectives import CollectiveError
from trainer.moe.dispatch import Dispatcher, received_row_blocks, regroup_index
from trainer.moe.expert_loop import row_blocks_of
from trainer.moe.router import Routing

from .distributed import groups_of, run_processes

E, K, D = 8, 2, 6
UNUSED_EXPERT = 7  # never chosen: its owner still runs with zero rows


def make_routing(rank: int, ep: int):
    gen = torch.Generator().manual_seed(100 + rank)
    T = 5 + 3 * rank  # uneven token counts across ranks
    expert_idx_TK = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])
    if rank == 1:  # this rank sends everything to the experts of EP rank 0
        first_owner = min(E // ep, UNUSED_EXPERT)
        expert_idx_TK = torch.stack([torch.randperm(first_owner, generator=gen)[:K] for _ in range(T)])
    keep_TK = torch.rand(T, K, generator=gen) > 0.2
    weight_TK = torch.rand(T, K, generator=gen).requires_grad_()
    x_TD = torch.randn(T, D, generator=gen).requires_grad_()
    routing = Routing(expert_idx_TK, weight_TK, keep_TK, torch.zeros(E), torch.zeros(()), torch.zeros(E + 2))
    return x_TD, routing


def expected_rows(all_inputs, group_ranks, local_experts):
    """Rows the owner of `local_experts` must receive: by local expert, then source rank, then route order."""
    blocks = []
    for expert in local_experts:
        for src in group_ranks:
            x, idx, keep = all_inputs[src]
            routes = [(t, k) for t in range(idx.shape[0]) for k in range(K) if keep[t, k] and idx[t, k] == expert]
            blocks.extend(x[t] for t, _ in routes)
    return torch.stack(blocks) if blocks else torch.zeros(0, D)


def _dispatch_worker(rank, world_size):
    for ep in (1, 2, 4):
        group = groups_of(ep, world_size)
        x_TD, routing = make_routing(rank, ep)
        dispatcher = Dispatcher(E, group, where=f"test ep={ep}", debug_splits=True)
        x_XD, plan = dispatcher.dispatch(x_TD, routing)

        # the right rows arrive, grouped by local expert
        all_inputs = [None] * world_size
        dist.all_gather_object(all_inputs, (x_TD.detach(), routing.expert_idx_TK, routing.keep_TK))
        ep_rank = rank % ep
        group_ranks = list(range(rank - ep_rank, rank - ep_rank + ep))
        local_experts = list(range(ep_rank * E // ep, (ep_rank + 1) * E // ep))
        torch.testing.assert_close(x_XD.detach(), expected_rows(all_inputs, group_ranks, local_experts), rtol=0, atol=0)
        assert len(plan.tokens_per_local_expert) == E // ep and sum(plan.tokens_per_local_expert) == x_XD.shape[0]
        if UNUSED_EXPERT in local_experts:
            assert plan.tokens_per_local_expert[local_experts.index(UNUSED_EXPERT)] == 0

        # "experts" that scale by (global id + 1) make misrouted rows visible; combine must undo the trip
        scale_X = torch.repeat_interleave(torch.tensor(local_experts, dtype=torch.float32) + 1,
                                          torch.tensor(plan.tokens_per_local_expert))
        out_TD = dispatcher.combine(x_XD * scale_X[:, None], plan)
        factor_TK = routing.keep_TK * routing.weight_TK * (routing.expert_idx_TK + 1)
        x_ref = x_TD.detach().clone().requires_grad_()
        w_ref = routing.weight_TK.detach().clone().requires_grad_()
        ref_TD = ((routing.keep_TK * w_ref * (routing.expert_idx_TK + 1)).sum(-1))[:, None] * x_ref
        torch.testing.assert_close(out_TD, factor_TK.sum(-1, keepdim=True) * x_TD, rtol=1e-6, atol=1e-6)

        upstream = torch.randn(out_TD.shape, generator=torch.Generator().manual_seed(rank))
        out_TD.backward(upstream)
        ref_TD.backward(upstream)
        torch.testing.assert_close(x_TD.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(routing.weight_TK.grad, w_ref.grad, rtol=1e-6, atol=1e-6)


def test_dispatch_round_trip_at_ep_1_2_4():
    run_processes(_dispatch_worker, 4)


def test_regroup_index_orders_by_expert_then_rank():
    counts_PL = torch.tensor([[2, 0, 1], [1, 3, 0]])
    # rank-major rows: r0e0 r0e0 r0e2 | r1e0 r1e1 r1e1 r1e1 -> expert-major: e0 (r0, r0, r1), e1 (r1 x3), e2 (r0)
    assert regroup_index(counts_PL).tolist() == [0, 1, 3, 4, 5, 6, 2]


def test_received_row_blocks_lie_where_the_rows_do():
    counts_PL = torch.tensor([[2, 0, 1], [1, 3, 0]])
    # rank-major: r0e0 x2, r0e2, r1e0, r1e1 x3
    assert received_row_blocks(counts_PL, expert_major=False) == [(0, 0, 2), (2, 2, 3), (0, 3, 4), (1, 4, 7)]
    # expert-major (after regroup_index): one block per expert with rows, as grouped GEMM needs
    assert received_row_blocks(counts_PL, expert_major=True) == row_blocks_of(counts_PL.sum(0).tolist())
    one_expert_PL = torch.tensor([[3], [0], [2]])  # ep = num_experts: each rank's rows of its one expert
    assert received_row_blocks(one_expert_PL, expert_major=True) == [(0, 0, 5)]
    assert received_row_blocks(one_expert_PL, expert_major=False) == [(0, 0, 5)]


def _mismatch_worker(rank, world_size):
    experts = 4 if rank == 0 else 8  # a rank built with a different expert count
    dispatcher = Dispatcher(experts, dist.group.WORLD, where="moe layer 5", debug_splits=True)
    idx = torch.zeros(3, 1, dtype=torch.int64)
    routing = Routing(idx, torch.ones(3, 1), torch.ones(3, 1, dtype=torch.bool), None, None, None)
    with pytest.raises(CollectiveError, match=r"moe layer 5: ranks of the EP group disagree"):
        dispatcher.dispatch(torch.randn(3, D), routing)


def test_debug_splits_catches_ranks_that_disagree_on_the_layer():
    run_processes(_mismatch_worker, 2)


def _corrupt_counts_worker(rank, world_size, debug_splits):
    """Rank 1's count exchange delivers one count too many, as gloo does with mismatched splits:
    the split-matrix check must name the layer and the rank instead of moving garbage rows."""
    import trainer.moe.dispatch as dispatch_module
    if rank == 1:
        exchange = dispatch_module.all_to_all_counts

        def corrupted(send_counts, group, where):
            recv = exchange(send_counts, group, where)
            recv[0, 0] += 1
            return recv
        dispatch_module.all_to_all_counts = corrupted
    dispatcher = Dispatcher(4, dist.group.WORLD, where="moe layer 2", debug_splits=debug_splits)
    idx = torch.tensor([[0], [1], [2], [3]])
    routing = Routing(idx, torch.ones(4, 1), torch.ones(4, 1, dtype=torch.bool), None, None, None)
    if rank == 1:
        with pytest.raises(CollectiveError, match=r"moe layer 2: EP rank 1 received counts .* senders report"):
            dispatcher.dispatch(torch.randn(4, D), routing)
    else:
        with pytest.raises(CollectiveError):  # its peer stopped: the layer's next collective fails, named
            dispatcher.dispatch(torch.randn(4, D), routing)


def test_debug_splits_catches_a_corrupted_count_exchange():
    run_processes(_corrupt_counts_worker, 2, True, timeout_s=10.0)


def _timeout_worker(rank, world_size):
    from trainer.moe import MoE
    # a short timeout on the layer's group only, so slow process start-up cannot trip it
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
    layer = MoE(D, 8, 4, top_k=1, ep_group=short, layer_id=3)
    layer.init_weights(0)
    if rank == 0:  # rank 1 never joins the forward: rank 0 must fail, not hang
        with pytest.raises(CollectiveError, match=r"moe layer 3: .* failed"):
            layer(torch.randn(4, D))


def test_a_missing_peer_becomes_an_error_naming_the_layer():
    run_processes(_timeout_worker, 2)


def _overload_worker(rank, world_size):
    from trainer.moe import LoadError, MoE

    layer = MoE(D, 8, 4, top_k=1, ep_group=dist.group.WORLD, layer_id=6, max_recv_factor=1.5)
    layer.init_weights(0)
    with torch.no_grad():  # every token's choice is expert 0, on EP rank 0: twice the balanced load
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x = torch.rand(8, D) + 0.1
    with pytest.raises(LoadError, match=r"moe layer 6: in training, EP rank 0 would receive 2\.00x the balanced load "
                                        r"\(16 of 16 routes .*moe\.max_recv_factor=1\.5\); .*moe\.capacity_factor"):
        layer(x)
    layer.eval()
    with pytest.raises(LoadError, match=r"in evaluation, .*set moe\.eval_capacity_factor"):
        layer(x)
    layer.train()
    layer.max_recv_factor = None
    layer.dispatcher.max_recv_factor = None
    assert layer(x).out.shape == x.shape  # without the limit the same call goes through


def test_a_receive_buffer_over_max_recv_factor_fails_on_every_rank_alike():
    run_processes(_overload_worker, 2)


def _uneven_worker(rank, world_size):
    from trainer.config import ModelConfig, MoEConfig
    from trainer.model import Transformer
    from trainer.moe import MoE, all_finished

    # a layer with every expert on one process is the reference for each real call
    reference = MoE(D, 16, 4, top_k=2, layer_id=2, capacity_factor=1.5)
    reference.init_weights(0)
    layer = MoE(D, 16, 4, top_k=2, ep_group=dist.group.WORLD, layer_id=2, capacity_factor=1.5)
    layer.init_weights(0)
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randn(5, D, generator=gen) for _ in range(2 if rank == 0 else 5)]  # uneven work
    done, calls = 0, 0
    while not all_finished(done == len(batches), dist.group.WORLD):
        calls += 1
        if done == len(batches):
            assert layer(torch.empty(0, D)).out.shape == (0, D)  # joins the collectives, adds nothing
            continue
        got = layer(batches[done]).out
        torch.testing.assert_close(got, reference(batches[done]).out, rtol=1e-5, atol=1e-6)
        done += 1
    assert calls == 5  # every rank made as many calls as the busiest one

    # a whole model takes an empty batch too
    cfg, moe_cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8), MoEConfig(num_experts=4, d_ff=16)
    model = Transformer(cfg, moe_cfg)
    model.init_weights(0)
    for moe in model.moe_layers:
        moe.apply_expert_parallel(dist.group.WORLD)
    tokens = torch.zeros((0 if rank == 1 else 2, 8), dtype=torch.long)
    assert model(tokens).logits.shape == (tokens.shape[0], 8, 256)


def test_ranks_with_zero_tokens_and_different_numbers_of_calls_complete():
    run_processes(_uneven_worker, 2, timeout_s=60.0)
