"""Invariants of real training steps on gloo processes, through `build_trainer` and `train_step`.

* Replicas stay bit-identical: dense parameters on every rank, each expert on its replicas,
  while distinct experts stay distinct.
* One step moves every parameter (router, norms, every expert on every rank).
* `GradSync.clip_` at one process is `torch.nn.utils.clip_grad_norm_`.
* The LM loss weighs every scored token alike whichever rank holds it: ranks with different
  numbers of ignored targets train exactly like one process on the whole batch.
* Experts are found by module membership, so a deepcopy or a meta-device build still keeps
  them out of the world average.
* Resident memory stays flat over hundreds of steps.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from trainer.build import build_model, build_trainer
from trainer.config import Config
from trainer.data import TokenBatches
from trainer.model import Transformer
from trainer.moe.collectives import all_gather_tensor
from trainer.parallel.dist import Layout, make_layout
from trainer.parallel.grad_sync import GradSync, split_dense_expert
from trainer.parallel.parallelize import parallelize
from trainer.train import train_step

from .distributed import run_processes

CPU = torch.device("cpu")
S = 16  # sequence length


def small_config(ep: int, batch_size: int, **train) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len = 32, 2, 2, S
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_ff, cfg.moe.capacity_factor = 4, 2, 32, None
    cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef = 0.05, 0.01
    cfg.parallel.ep = ep
    cfg.train.batch_size, cfg.train.device, cfg.train.dtype = batch_size, "cpu", "fp32"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def one_process_layout() -> Layout:
    return Layout(0, 1, 0, 1, CPU, None, None, None)


def random_tokens(n: int = 4000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(torch.uint8)


def random_steps(tr, steps: int, lr: float, seed: int = 0) -> list:
    """`steps` train_steps on random global batches, this rank taking its rank-major rows; the StepResults."""
    cfg, layout = tr.cfg, tr.layout
    gen = torch.Generator().manual_seed(seed)
    per_rank = cfg.train.batch_size // layout.world_size
    results = []
    for _ in range(steps):
        tokens = torch.randint(0, 256, (cfg.train.batch_size, cfg.model.seq_len + 1), generator=gen)
        mine = tokens[layout.rank * per_rank:(layout.rank + 1) * per_rank]
        results.append(train_step(tr, mine[:, :-1], mine[:, 1:], lr))
    return results


def expert_rows(model: Transformer) -> torch.Tensor:
    """[MoE layers * local experts, params of one expert]: each local expert's weights, flattened."""
    rows = []
    for moe in model.moe_layers:
        e = moe.experts
        for local in range(e.num_local_experts):
            rows.append(torch.cat([e.w1_LFD[local].flatten(), e.w3_LFD[local].flatten(), e.w2_LDF[local].flatten()]))
    return torch.stack(rows).detach()


# ----------------------------------------------------------------------------- a. replicas stay identical


def _replicas_worker(rank, world_size):
    cfg = small_config(ep=2, batch_size=8)
    layout = make_layout(cfg.parallel, CPU)
    tr = build_trainer(cfg, layout)
    batches = TokenBatches(random_tokens(), S, cfg.train.batch_size, rank, world_size, 0, True, "train")
    for step in range(5):
        result = train_step(tr, *batches.batch(step), lr=1e-2)
        assert result.applied

    dense = torch.cat([p.detach().flatten() for p in tr.grad_sync.dense])
    all_dense = all_gather_tensor(dense, layout.world_group, "test", "gather dense")
    for r in range(world_size):
        assert torch.equal(all_dense[r], all_dense[0]), f"dense parameters of rank {r} differ from rank 0's"

    all_experts = all_gather_tensor(expert_rows(tr.model), layout.world_group, "test", "gather experts")  # [W, L*2, P]
    for r in range(world_size):  # ranks r and r + ep hold the same experts
        replica = (r + layout.ep) % world_size
        assert torch.equal(all_experts[r], all_experts[replica]), f"experts of rank {r} differ from rank {replica}'s"
    # distinct experts: within a rank (local 0 vs 1) and across the EP group (rank 0's vs rank 1's)
    for layer in range(cfg.model.n_layers):
        held = [all_experts[r, layer * 2 + local] for r in range(layout.ep) for local in range(2)]  # global 0..3
        for i in range(len(held)):
            for j in range(i + 1, len(held)):
                assert not torch.equal(held[i], held[j]), f"layer {layer}: experts {i} and {j} are identical"


@pytest.mark.slow
def test_replicas_stay_bit_identical_and_experts_distinct():
    run_processes(_replicas_worker, 4)


# ----------------------------------------------------------------------------- b. every parameter moves


def _every_parameter_moves_worker(rank, world_size):
    # no weight decay: a parameter can only move through its gradient
    cfg = small_config(ep=2, batch_size=8, weight_decay=0.0)
    layout = make_layout(cfg.parallel, CPU)
    tr = build_trainer(cfg, layout)
    before = {name: p.detach().clone() for name, p in tr.model.named_parameters()}
    rows_before = expert_rows(tr.model)
    batches = TokenBatches(random_tokens(), S, cfg.train.batch_size, rank, world_size, 0, True, "train")
    assert train_step(tr, *batches.batch(0), lr=1e-3).applied

    names = set(before)
    for kind in ("router", "norm", "experts.w1_LFD", "experts.w2_LDF", "experts.w3_LFD", "embed", "lm_head"):
        assert any(kind in n for n in names), f"no {kind} parameter in the model"
    unchanged = [name for name, p in tr.model.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"rank {rank}: unchanged after one step: {unchanged}"
    same_expert = (expert_rows(tr.model) == rows_before).all(-1).nonzero().flatten().tolist()
    assert not same_expert, f"rank {rank}: local experts (layer * 2 + local) {same_expert} did not move"


@pytest.mark.slow
def test_one_step_moves_every_parameter_on_every_rank():
    run_processes(_every_parameter_moves_worker, 2)


# ----------------------------------------------------------------------------- c. clipping


def test_clip_matches_torch_clip_grad_norm_at_one_process():
    cfg = small_config(ep=1, batch_size=4)
    layout = one_process_layout()
    model = build_model(cfg, layout)
    inputs, targets = TokenBatches(random_tokens(), S, 4, 0, 1, 0, True, "train").batch(0)
    model(inputs, targets).loss.backward()
    reference = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = p.grad.clone()

    sync = GradSync(model, layout)
    sync.reduce()  # one process: a no-op that must not change the gradients
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    full_norm = float(torch.cat([q.grad.flatten() for q in reference.parameters()]).double().norm())
    max_norm = full_norm / 4
    assert len(sync.expert) == 3 * cfg.model.n_layers and len(sync.dense) > 0

    norm = sync.clip_(max_norm)
    torch_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert float(norm) == pytest.approx(float(torch_norm), rel=1e-6)
    assert float(norm) == pytest.approx(full_norm, rel=1e-6)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).double().norm()
    assert float(clipped) == pytest.approx(max_norm, rel=1e-5)  # clipping happened
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- d. token-weighted LM loss


def _token_weighted_worker(rank, world_size):
    global_batch = 8
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randint(0, 256, (global_batch, S), generator=gen)
    targets = torch.randint(0, 256, (global_batch, S), generator=gen)
    per_rank = global_batch // world_size
    rank0_rows = slice(0, per_rank)
    targets[rank0_rows] = torch.where(torch.arange(S) % 4 == 0, targets[rank0_rows], -100)  # rank 0 scores 1/4
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    lr = 1e-3

    for ep in (1, 2):
        cfg = small_config(ep=ep, batch_size=global_batch)
        tr = build_trainer(cfg, make_layout(cfg.parallel, CPU))
        got = train_step(tr, inputs[mine], targets[mine], lr)

        ref_cfg = small_config(ep=1, batch_size=global_batch)
        ref = build_trainer(ref_cfg, one_process_layout())
        want = train_step(ref, inputs, targets, lr)

        what = f"ep={ep} rank {rank}"
        assert got.applied and want.applied
        assert want.losses[2] > 0 and want.losses[3] > 0  # aux and z losses take part
        for i, key in enumerate(("loss", "lm_loss", "aux_loss", "z_loss")):
            assert got.losses[i] == pytest.approx(want.losses[i], rel=1e-5), f"{what}: {key}"
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5), what

        # AdamW's first step moves each element by about lr * sign(grad): an element whose gradient
        # nearly cancels may move slightly differently (seen: 2e-7, and 1.6e-6 on another CPU with
        # the same code). atol = lr / 100 stays far below the 2 * lr of a flipped sign, which is
        # what a wrongly weighted token does.
        tol = dict(rtol=1e-5, atol=lr / 100)
        ref_params = dict(ref.model.named_parameters())
        for name, p in tr.model.named_parameters():
            if ".experts." not in name:
                torch.testing.assert_close(p, ref_params[name], **tol, msg=lambda m: f"{what}: {name} {m}")
        for moe, ref_moe in zip(tr.model.moe_layers, ref.model.moe_layers):
            local = slice(moe.experts.first_expert_id, moe.experts.first_expert_id + moe.experts.num_local_experts)
            for w in ("w1_LFD", "w3_LFD", "w2_LDF"):
                torch.testing.assert_close(getattr(moe.experts, w), getattr(ref_moe.experts, w)[local], **tol,
                                           msg=lambda m: f"{what}: {moe.where} {w} {m}")


@pytest.mark.slow
def test_ranks_with_different_ignored_targets_train_like_one_process():
    run_processes(_token_weighted_worker, 2)


# ----------------------------------------------------------------------------- e. experts by module membership


def expert_names(model: torch.nn.Module) -> set[str]:
    _, expert = split_dense_expert(model)
    ids = {id(p) for p in expert}
    assert len(ids) == len(expert)
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _membership_worker(rank, world_size):
    cfg = small_config(ep=2, batch_size=4)
    layout = make_layout(cfg.parallel, CPU)
    on_meta = build_model(cfg, layout)  # built on the meta device, then parallelised
    eager = parallelize(Transformer(cfg.model, cfg.moe), layout, cfg.train.seed)  # built on the CPU
    with torch.device("meta"):
        unsharded = Transformer(cfg.model, cfg.moe)
    copied_then_sharded = parallelize(copy.deepcopy(unsharded), layout, cfg.train.seed)
    clone = copy.deepcopy(on_meta)  # a sharded model: the copy shares the groups, copies the tensors
    for (name, p), q in zip(on_meta.named_parameters(), clone.parameters()):
        assert p is not q and torch.equal(p, q), name
    assert [m.stats_group for m in clone.moe_layers] == [m.stats_group for m in on_meta.moe_layers]

    expected = {f"blocks.{i}.ffn.experts.{w}" for i in range(cfg.model.n_layers) for w in ("w1_LFD", "w3_LFD", "w2_LDF")}
    for what, model in (("meta-built", on_meta), ("eager", eager), ("deepcopy of a sharded model", clone),
                        ("deepcopy, then sharded", copied_then_sharded)):
        assert expert_names(model) == expected, what
        dense, expert = split_dense_expert(model)
        assert len(dense) + len(expert) == len(list(model.parameters())), what

    # a GradSync over the deepcopy: each rank's experts keep their own gradient (scaled 1/W),
    # they are not averaged with the other rank's experts
    inputs, targets = TokenBatches(random_tokens(), S, 4, rank, world_size, 0, True, "train").batch(0)
    clone(inputs, targets).loss.backward()
    sync = GradSync(clone, layout)
    local_expert_grads = [p.grad.clone() for p in sync.expert]
    sync.reduce()
    for p, local in zip(sync.expert, local_expert_grads):
        assert torch.equal(p.grad, local * (1.0 / world_size))
    expert_grads = torch.cat([p.grad.flatten() for p in sync.expert])
    dense_grads = torch.cat([p.grad.flatten() for p in sync.dense])
    all_expert = all_gather_tensor(expert_grads, layout.world_group, "test", "gather expert grads")
    all_dense = all_gather_tensor(dense_grads, layout.world_group, "test", "gather dense grads")
    assert torch.equal(all_dense[0], all_dense[1])  # dense: averaged, the same everywhere
    assert not torch.equal(all_expert[0], all_expert[1])  # experts 0, 1 on rank 0 vs 2, 3 on rank 1
    all_params = all_gather_tensor(expert_rows(clone), layout.world_group, "test", "gather experts")
    assert not torch.equal(all_params[0], all_params[1])


@pytest.mark.slow
def test_experts_are_found_by_module_membership():
    run_processes(_membership_worker, 2)


# ----------------------------------------------------------------------------- f. resident memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Growth bound between step 50 and step 200 (150 steps). Measured on this tiny model (2 layers,
# d_model 32, seq 32, 2 sequences per rank): about 2 MB without a leak (allocator warm-up, then
# flat). A real per-step leak must be under 10 MB / 150 steps = 68 KB per step to slip through.
# Appending each step's loss tensor with its graph keeps, per step, the autograd nodes of the
# whole forward and backward (hundreds of nodes with their metadata, the routing plans held by
# the all_to_all autograd contexts) plus the 2 x 32 x 256 fp32 logits' graph inputs: measured
# +24 MB over these 150 steps; keeping each step's logits: +30 MB. Both exceed 10 MB by 2x or more.
RSS_GROWTH_BOUND = 10e6


def _memory_worker(rank, world_size):
    cfg = small_config(ep=2, batch_size=4)
    cfg.model.seq_len = 32
    tr = build_trainer(cfg, make_layout(cfg.parallel, CPU))
    batches = TokenBatches(random_tokens(20_000), 32, cfg.train.batch_size, rank, world_size, 0, True, "train")
    rss = {}
    for step in range(1, 201):
        assert train_step(tr, *batches.batch(step - 1), lr=1e-3).applied
        if step in (50, 200):
            rss[step] = resident_bytes()
    print(f"rank {rank}: resident memory growth from step 50 to 200: {(rss[200] - rss[50]) / 1e6:.2f} MB")
    assert rss[200] - rss[50] < RSS_GROWTH_BOUND, (
        f"rank {rank}: resident memory grew {(rss[200] - rss[50]) / 1e6:.1f} MB from step 50 to 200")


@pytest.mark.slow
def test_resident_memory_stays_flat():
    run_processes(_memory_worker, 2)


def test_routing_window_reports_spread_dead_experts_and_entropy_over_its_steps():
    from trainer.run.tracking import RoutingWindow

    window = RoutingWindow()
    assert window.summary() == {}  # a dense model reports nothing
    window.add(torch.tensor([[2, 2, 2, 2], [4, 0, 0, 0]]), torch.tensor([1.0, 0.5]))
    window.add(torch.tensor([[2, 2, 2, 2], [0, 0, 4, 0]]), torch.tensor([1.0, 0.3]))
    record = window.summary(per_expert=True)
    # layer 0: perfectly even (cv 0); layer 1: loads [4, 0, 4, 0] over the window: cv 1, two dead experts
    assert record["expert_load_cv"] == pytest.approx(1.0) and record["expert_load_cv_mean"] == pytest.approx(0.5)
    assert record["dead_experts"] == 2 and record["dead_experts_mean"] == 1.0
    assert record["router_entropy"] == pytest.approx((1.0 + 0.4) / 2) and record["router_entropy_min"] == pytest.approx(0.4)
    assert record["expert_counts"] == [[4, 4, 4, 4], [4, 0, 4, 0]]
    assert window.summary() == {}  # each log line starts a new window


# ----------------------------------------------------------------------------- e. overlapped gradient sync


def _overlap_worker(rank, world_size):
    """4 ranks, ep=2 (dense buckets over the world, expert buckets over the replicas): buckets
    launched during backward give the same gradients, bit for bit, as all launched afterwards."""
    cfg = small_config(ep=2, batch_size=8)
    layout = make_layout(cfg.parallel, CPU)
    model = build_model(cfg, layout)
    inputs, targets = TokenBatches(random_tokens(), S, 8, rank, world_size, 0, True, "train").batch(0)
    results = {}
    for overlap in (False, True):
        sync = GradSync(model, layout, bucket_mb=0.05, overlap=overlap)  # small buckets: many of them
        assert {b.what for b in sync.buckets} == {"dense", "expert"} and len(sync.buckets) > 4
        model.zero_grad(set_to_none=True)
        sync.expect_backward(last_micro_batch=True)
        model(inputs, targets).loss.backward()
        launched_during_backward = sync._next
        sync.reduce()
        results[overlap] = ([p.grad.clone() for p in model.parameters()], launched_during_backward)
        sync.expect_backward(last_micro_batch=False)
    assert results[False][1] == 0
    assert results[True][1] == len(GradSync(model, layout, bucket_mb=0.05, overlap=False).buckets)
    for (name, _), a, b in zip(model.named_parameters(), results[False][0], results[True][0]):
        assert torch.equal(a, b), f"rank {rank}: {name}"


@pytest.mark.slow
def test_overlapped_gradient_sync_launches_in_backward_and_changes_nothing():
    run_processes(_overlap_worker, 4)


# ----------------------------------------------------------------------------- expert learning rate


def test_expert_lr_scale_scales_the_routed_experts_update_only():
    """AdamW's update and its decoupled weight decay are both linear in the lr: with
    train.expert_lr_scale=s the experts move s times as far in a step, everything else alike."""
    updates = []
    for scale in (1.0, 0.25):
        tr = build_trainer(small_config(ep=1, batch_size=4, expert_lr_scale=scale, grad_clip=0.0),
                           one_process_layout())
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        assert train_step(tr, *TokenBatches(random_tokens(), S, 4, 0, 1, 0, True, "train").batch(0), lr=1e-2).applied
        updates.append({n: p.detach() - before[n] for n, p in tr.model.named_parameters()})
    experts = expert_names(tr.model)
    assert experts and len(experts) < len(updates[0])
    for name, full in updates[0].items():
        scaled = updates[1][name]
        expected = 0.25 * full if name in experts else full
        assert full.abs().max() > 0, name
        torch.testing.assert_close(scaled, expected, rtol=1e-4, atol=1e-9, msg=lambda m: f"{name}: {m}")
