"""Training parity through the real CLI: 1 process == 2 processes (ep=2) == 4 processes (ep=2, 2 replicas).

Dropless, fp32, aux and z losses on: per-step loss, gradient norm and the routing metrics
(load spread, router entropy) must agree to rel. 1e-5, routes per expert exactly.
"""

import pytest

from trainer.run.tracking import read_metrics

from .cli import run_cli

SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=64",
    "moe.num_experts=4", "moe.top_k=2", "moe.d_ff=96", "moe.capacity_factor=null",
    "moe.aux_loss_coef=0.01", "moe.z_loss_coef=0.001",
    "train.steps=10", "train.batch_size=8", "train.warmup_steps=2", "train.lr=3e-3",
    "train.eval_every=0", "train.eval_batches=1", "train.dtype=fp32", "train.device=cpu",
    "run.log_every=1", "run.progress=false", "run.log_expert_counts=true",
]


def train_run(tmp_path, name, nproc, ep, extra=()):
    run_dir = tmp_path / name
    result = run_cli(["train", "configs/tiny.yaml", *SMALL, f"parallel.ep={ep}", f"run.dir={run_dir}", *extra],
                     nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(run_dir)


def test_per_step_loss_and_grad_norm_match_one_process(tmp_path):
    reference = train_run(tmp_path, "one", 1, 1)
    runs = {"2 procs ep=2": train_run(tmp_path, "two", 2, 2), "4 procs ep=2": train_run(tmp_path, "four", 4, 2)}
    assert [m["step"] for m in reference] == list(range(1, 11))
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trains
    assert all(m["aux_loss"] > 0 and m["z_loss"] > 0 and m["dropped_frac"] == 0 for m in reference)
    worst = {}
    for name, metrics in runs.items():
        assert [m["step"] for m in metrics] == [m["step"] for m in reference]
        for ref, got in zip(reference, metrics):
            # routing metrics are global too: the same routes per expert, spread and entropy
            assert got["expert_counts"] == ref["expert_counts"], f"{name} step {ref['step']}"
            assert got["dead_experts"] == ref["dead_experts"]
            for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "expert_load_cv", "router_entropy",
                        "router_entropy_min"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5), f"{name} step {ref['step']} {key}"
                worst[key] = max(worst.get(key, 0.0), abs(got[key] - ref[key]) / abs(ref[key]))
        assert metrics[-1]["val_loss"] == pytest.approx(reference[-1]["val_loss"], rel=1e-5)
    print("largest relative differences:", {k: f"{v:.2e}" for k, v in worst.items()})


def test_capacity_drops_are_reported(tmp_path):
    metrics = train_run(tmp_path, "capped", 2, 2, ["moe.capacity_factor=0.5", "train.steps=3"])
    assert all(0 < m["dropped_frac"] < 1 for m in metrics)


def test_gradient_accumulation_equals_more_ranks(tmp_path):
    """(1 process, 2 micro-batches) == (2 processes, 1 micro-batch each) for the LM objective.

    The balance statistics cover one micro-batch across all ranks (README), so the aux and z
    losses are off here; everything else about the step must be the same.
    """
    no_aux = ["moe.aux_loss_coef=0", "moe.z_loss_coef=0", "train.steps=5"]
    accumulated = train_run(tmp_path, "accum", 1, 1, [*no_aux, "train.grad_accum=2"])
    wide = train_run(tmp_path, "wide", 2, 2, no_aux)
    for a, w in zip(accumulated, wide):
        assert a["loss"] == pytest.approx(w["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), a["step"]


def test_expert_bias_balancing_is_the_same_on_every_layout(tmp_path):
    """Aux-loss-free balancing: the bias follows global counts, so 2 processes route like one."""
    bias = ["moe.aux_loss_coef=0", "moe.expert_bias_rate=0.01", "train.steps=6"]
    one = train_run(tmp_path, "bias-one", 1, 1, bias)
    two = train_run(tmp_path, "bias-two", 2, 2, bias)
    for ref, got in zip(one, two):
        assert got["expert_counts"] == ref["expert_counts"], ref["step"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    without = train_run(tmp_path, "no-bias", 1, 1, ["moe.aux_loss_coef=0", "train.steps=6"])
    assert without[-1]["expert_counts"] != one[-1]["expert_counts"]  # the bias did change the routing


@pytest.mark.parametrize("scope,extra", [("sequence", []),
                                         ("global_batch", ["moe.router_jitter=0.2", "moe.noisy_topk=true"])],
                         ids=["sequence", "global_batch+noise"])  # noise keeps step 1's aux at exactly 1
def test_balance_scope_is_the_same_objective_for_any_world_size_and_accumulation(tmp_path, scope, extra):
    """(2 processes, 1 micro-batch) == (1 process, 2 micro-batches) == (4 processes ep=4, 2 micro-batches; sequence scope)
    == (1 process, 1 micro-batch)."""
    strong_aux = ["moe.aux_loss_coef=0.5", "train.steps=5", f"moe.aux_loss_scope={scope}", *extra]
    runs = {"w2 a1": train_run(tmp_path, f"{scope}-w2", 2, 2, strong_aux),
            "w1 a2": train_run(tmp_path, f"{scope}-a2", 1, 1, [*strong_aux, "train.grad_accum=2"])}
    if scope == "sequence":  # 4 processes on 2 cores are slow: both at once for one scope
        runs["w4 ep4 a2"] = train_run(tmp_path, f"{scope}-w4", 4, 4, [*strong_aux, "train.grad_accum=2"])
    reference = train_run(tmp_path, f"{scope}-w1", 1, 1, strong_aux)
    if scope == "global_batch":  # no previous step: f is uniform, the aux loss exactly 1
        assert reference[0]["aux_loss"] == pytest.approx(1.0, abs=1e-6)
    assert len({round(m["aux_loss"], 4) for m in reference}) > 1  # and it is not constant
    for name, metrics in runs.items():
        for ref, got in zip(reference, metrics):
            for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5), f"{scope} {name} step {ref['step']} {key}"


def test_micro_batch_scope_differs_with_accumulation_where_it_must(tmp_path):
    strong_aux = ["moe.aux_loss_coef=0.5", "train.steps=2", "moe.aux_loss_scope=micro_batch"]
    whole = train_run(tmp_path, "mb-whole", 1, 1, strong_aux)
    halves = train_run(tmp_path, "mb-halves", 1, 1, [*strong_aux, "train.grad_accum=2"])
    # f from each half-batch's own counts is not f of the whole batch
    assert halves[0]["aux_loss"] != pytest.approx(whole[0]["aux_loss"], rel=1e-5)
    assert halves[0]["lm_loss"] == pytest.approx(whole[0]["lm_loss"], rel=1e-5)
