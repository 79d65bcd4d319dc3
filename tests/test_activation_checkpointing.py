"""train.activation_checkpointing: `full` and `moe` train bit-exactly like `none` (CPU, fp32) with every
routing feature that keeps state or draws noise switched on (capacity drops, expert bias, noisy top-k,
jitter, the global-batch balance scope), on one process and on 2 gloo processes exchanging tokens;
the recompute really happens and replays the forward's decision; each mode saves less; a recompute
that routes again (counting its routes a second time) is caught."""

from __future__ import annotations

import pytest
import torch

from trainer.build import build_trainer
from trainer.moe import recompute
from trainer.parallel.dist import make_layout

from .distributed import run_processes
from .test_training_invariants import CPU, one_process_layout, random_steps, small_config

STEPS = 3
ROUTING = {"capacity_factor": 1.0, "expert_bias_rate": 0.01, "noisy_topk": True, "router_jitter": 0.1,
           "aux_loss_scope": "global_batch"}


def _config(mode: str, ep: int, **moe):
    cfg = small_config(ep, 8, warmup_steps=1, activation_checkpointing=mode, grad_accum=2)
    for key, value in {**ROUTING, **moe}.items():
        setattr(cfg.moe, key, value)
    return cfg


def _train(cfg, layout):
    """(per-step losses and norms, every parameter and buffer afterwards, recomputes replayed)."""
    replays = []
    original = recompute.replayed

    def counting(layer, where):
        decision = original(layer, where)
        replays.append(decision is not None)
        return decision

    recompute.replayed = counting
    try:
        tr = build_trainer(cfg, layout)
        history = [(r.losses, r.grad_norm, r.routing) for r in random_steps(tr, STEPS, 1e-2)]
    finally:
        recompute.replayed = original
    state = {name: t.detach().clone() for name, t in tr.model.state_dict(keep_vars=True).items()}
    state.update({name: b.clone() for name, b in tr.model.named_buffers()})  # pending counts too
    return history, state, sum(replays)


def assert_bit_exact(got, want, what: str) -> None:
    assert got[0] == want[0], f"{what}: per-step (losses, norm, routing) {got[0]} vs {want[0]}"
    for name, tensor in want[1].items():
        assert torch.equal(got[1][name], tensor), f"{what}: {name} differs after {STEPS} steps"


def _compare_modes(layout, ep):
    baseline = _train(_config("none", ep), layout)
    assert baseline[2] == 0
    assert baseline[0][0][2][0] > 0, "capacity 1.0 must drop routes here, or the test proves nothing"
    moe_layers = 2  # small_config: 2 blocks, every one MoE
    for mode in ("full", "moe"):
        got = _train(_config(mode, ep), layout)
        assert got[2] == moe_layers * 2 * STEPS, f"{mode}: {got[2]} recomputes replayed a decision"
        assert_bit_exact(got, baseline, f"activation_checkpointing={mode}, ep {ep}")


def test_checkpointed_training_is_bit_exact_on_one_process():
    _compare_modes(one_process_layout(), 1)


def _two_ranks(rank, world_size):
    _compare_modes(make_layout(_config("none", 2).parallel, CPU), 2)


@pytest.mark.slow
def test_checkpointed_training_is_bit_exact_with_tokens_exchanged_between_ranks():
    run_processes(_two_ranks, 2)


def test_a_recompute_that_routes_again_is_caught(monkeypatch):
    baseline = _train(_config("none", 1), one_process_layout())
    monkeypatch.setattr(recompute, "replayed", lambda layer, where: None)  # recompute decides (and counts) anew
    rerouted = _train(_config("moe", 1), one_process_layout())
    with pytest.raises(AssertionError, match="prev_counts_E|expert_bias_E|losses"):
        assert_bit_exact(rerouted, baseline, "rerouted")


def test_each_mode_saves_less_for_backward():
    from trainer.tools.measure import activation_bytes

    saved = {}
    for mode in ("none", "moe", "full"):
        cfg = _config(mode, 1)
        tr = build_trainer(cfg, one_process_layout())
        tokens = torch.randint(0, 256, (4, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(0))
        saved[mode] = activation_bytes(lambda: tr.model(tokens[:, :-1], tokens[:, 1:]).loss, tr.model.parameters())
    assert saved["full"] < saved["moe"] < saved["none"], saved
