"""`python -m trainer bench` under torchrun with 2 gloo processes: one JSON line per case with
the contract's fields, figures that hang together, and a training-step case with MFU.
(Speed itself is never asserted: the benchmark measures it.)"""

import json

import pytest
import torch

from tests.cli import run_cli

LAYER_FIELDS = {"case", "tokens_per_s", "ceiling_tokens_per_s", "ratio", "peak_mem_mb", "split_ms", "expert_impl",
                "activation_mb", "experts_vs_peak", "matmul_peak_tflops"}


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_bench_layer_and_step_cases_under_torchrun(tmp_path):
    out_file = tmp_path / "bench.jsonl"
    proc = run_cli(["bench", "--preset", "quick", "--cases", "E8-dropless,cap", "--iters", "1", "--rounds", "1",
                    "--config", "configs/tiny.yaml", "--steps", "1", "--warmup", "1", "model.n_layers=2",
                    "train.batch_size=4", "--out", str(out_file)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = records(proc.stdout)
    assert records(out_file.read_text()) == lines
    by_case = {r["case"]: r for r in lines}
    assert "matmul_peak-fp32" in by_case and by_case["matmul_peak-fp32"]["tflops"] > 0
    layer = [r for r in lines if r["case"].startswith("fp32-E8")]
    assert {r["capacity_factor"] for r in layer} == {None, 1.25}
    for r in layer:
        assert LAYER_FIELDS <= r.keys(), r.keys()
        assert r["ranks"] == 2 and r["tokens_per_s"] > 0 and r["ceiling_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / r["ceiling_tokens_per_s"], rel=1e-3)
        assert set(r["split_ms"]) == {"router", "permute", "all_to_all", "experts", "combine"}
        assert all(v >= 0 for v in r["split_ms"].values()) and r["split_ms"]["experts"] > 0
        assert 0 < r["experts_vs_peak"] and r["activation_mb"] > 0
    step = next(r for r in lines if r["case"].startswith("step:configs/tiny.yaml"))
    assert step["ranks"] == 2 and step["tokens_per_s"] > 0 and 0 < step["mfu"] < 1
    assert proc.stderr.count("bf16 matrix instructions") == 1


@pytest.mark.slow
def test_bench_times_several_configs_alternately_with_ratio_and_profile():
    """Two configs in one run, one with its own overrides: the ratio is to the first, the rounds
    alternate, and the profile charges the MoE's work to MoE parts and the dense FFN's to dense_ffn."""
    shared = ["model.n_layers=2", "train.batch_size=4", "model.seq_len=64"]
    proc = run_cli(["bench", "--config", "configs/quality/dense.yaml", "--config",
                    "configs/tiny.yaml moe.num_experts=4 parallel.ep=2", "--steps", "2", "--warmup", "1",
                    "--rounds", "2", "--profile", *shared], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense, moe = records(proc.stdout)
    assert dense["case"] == "step:configs/quality/dense.yaml " + " ".join(shared)
    assert moe["case"] == "step:configs/tiny.yaml " + " ".join([*shared, "moe.num_experts=4", "parallel.ep=2"])
    assert dense["ratio"] == 1.0
    assert moe["ratio"] == pytest.approx(moe["tokens_per_s"] / dense["tokens_per_s"], rel=1e-3)
    for r in (dense, moe):
        assert len(r["rounds_tokens_per_s"]) == 2 and r["ranks"] == 2 and r["compile"] is False
        parts = r["profile_ms"]
        assert r["profile_max_ms"].keys() == parts.keys()
        assert all(r["profile_max_ms"][p] >= parts[p] - 0.011 for p in parts)  # the busiest rank's, not below the mean
        assert all(v >= 0 for v in parts.values()) and parts["attention"] > 0 and parts["optimizer"] > 0
    d, m = dense["profile_ms"], moe["profile_ms"]
    assert d["dense_ffn"] > 0 and all(d[p] == 0 for p in ("router", "dispatch", "all_to_all", "experts", "combine")), d
    assert m["dense_ffn"] == 0 and all(m[p] > 0 for p in ("router", "dispatch", "all_to_all", "experts", "combine")), m
    # a backward op is charged to its forward's part: the experts' backward is most of their time
    assert m["experts"] > m["model_other"], m


def test_bench_refuses_overrides_without_a_config():
    proc = run_cli(["bench", "--preset", "quick", "moe.num_experts=4"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: bench: key=value overrides")


def test_bench_names_a_bad_config_key():
    proc = run_cli(["bench", "--config", "configs/tiny.yaml", "moe.nope=1"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config: ")
    assert "moe.nope" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_gpu_preset_without_cuda_is_one_line_not_a_long_cpu_run():
    proc = run_cli(["bench", "--preset", "gpu"], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: bench: --preset gpu needs CUDA (torch.cuda.is_available() is "
                                                "False); use --preset reference or quick here"]


@pytest.mark.slow
def test_bench_times_deepspeeds_moe_layer_beside_ours():
    proc = run_cli(["bench", "--preset", "quick", "--cases", "E8-dropless,cap", "--iters", "1", "--rounds", "2",
                    "--peer", "deepspeed"], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layer = [r for r in records(proc.stdout) if r["case"].startswith("fp32-E8")]
    assert {r["capacity_factor"] for r in layer} == {None, 1.25}
    for r in layer:
        assert r["peer"] == "deepspeed" and r["peer_d_ff"] == 192  # 1.5 x d_ff 128: the same FLOPs in 2 matmuls
        assert r["peer_tokens_per_s"] > 0 and len(r["peer_rounds_tokens_per_s"]) == 2
        assert r["vs_peer"] == pytest.approx(r["tokens_per_s"] / r["peer_tokens_per_s"], rel=1e-3)


def test_the_peer_is_skipped_with_a_reason_where_it_cannot_run(monkeypatch):
    from trainer.tools.bench_peer import peer_d_ff, peer_problem

    if peer_problem(2) is not None and "not installed" in peer_problem(2):
        pytest.skip("deepspeed is not installed")
    assert peer_problem(2) is None
    assert "top_k=4" in peer_problem(4)
    assert 3 * 256 * 1024 == 2 * 256 * peer_d_ff(1024)  # SwiGLU's three matmuls = GELU MLP's two
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", None)  # as if not installed
    assert peer_problem(2).startswith("deepspeed is not installed")


def _profile_worker(rank, world_size):
    from torch.profiler import profile

    from trainer.build import build_trainer
    from trainer.parallel.dist import make_layout
    from trainer.tools.step_profile import charged_parts, labelled_parts

    from .test_training_invariants import CPU, random_steps, small_config

    cfg = small_config(ep=2, batch_size=8)
    cfg.moe.num_shared_experts = 1  # the token exchange is split around them (start/wait)
    tr = build_trainer(cfg, make_layout(cfg.parallel, CPU))
    random_steps(tr, 1, lr=1e-3)
    with labelled_parts(tr.model, tr.engine), profile() as prof:
        random_steps(tr, 1, lr=1e-3, seed=1)
    charged = [(e.name, part) for e, part in charged_parts([e for e in prof.events() if not e.is_async])]
    exchanges = [part for name, part in charged if name == "c10d::alltoall_base_"]
    # per MoE layer: the count exchange (dispatch), tokens there and back, their gradients back and there
    assert exchanges.count("dispatch") == 2 and exchanges.count("all_to_all") == 8, exchanges
    waits = {part for name, part in charged if name.startswith(("_WaitAllToAllRows", "_StartAllToAllRowsBackward"))}
    assert waits == {"all_to_all"}, waits
    assert {part for name, part in charged if name.startswith("ExpertLoopSwiGLU")} == {"experts"}


@pytest.mark.slow
def test_the_profile_charges_every_exchange_to_its_part_with_shared_experts_overlapped():
    from .distributed import run_processes

    run_processes(_profile_worker, 2)
