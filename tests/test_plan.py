"""`python -m trainer plan`: the bytes it plans from fake process groups are what real gloo runs hold.

At world 1, 2 and 4, native and fsdp, ep 1/2/4: parameter, gradient and optimizer-state bytes of rank 0
equal the plan's exactly; activation bytes (per micro-batch, each activation checkpointing mode) are
within 15% of what autograd saves (saved-tensor hooks, as bench measures them). The CLI prints one
JSON line and a one-line summary, plans thousands of ranks, and refuses bad input in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.build import build_trainer
from trainer.parallel.activation_checkpointing import checkpointed_modules
from trainer.parallel.dist import make_layout
from trainer.parallel.memory import measured_bytes
from trainer.tools.measure import activation_bytes
from trainer.tools.plan import plan

from .cli import run_cli
from .distributed import run_processes
from .test_training_invariants import CPU, small_config

LAYOUTS = {1: [("native", 1), ("fsdp", 1)], 2: [("native", 2), ("fsdp", 2), ("fsdp", 1)],
           4: [("native", 4), ("fsdp", 2), ("fsdp", 4)]}
MODES = ("none", "moe", "full")


def _config(engine: str, ep: int, mode: str = "none"):
    cfg = small_config(ep, 8, engine=engine, activation_checkpointing=mode)
    cfg.moe.num_experts = 8  # 2 per rank at ep 4, and FSDP shards of whole experts over the replicas
    return cfg


def _measure_worker(rank, world_size, out_dir):
    for engine, ep in LAYOUTS[world_size]:
        cfg = _config(engine, ep)
        layout = make_layout(cfg.parallel, CPU)
        tr = build_trainer(cfg, layout)
        tokens = torch.randint(0, 256, (cfg.train.batch_size // world_size, cfg.model.seq_len + 1),
                               generator=torch.Generator().manual_seed(rank))
        out = tr.engine.forward(tokens[:, :-1], tokens[:, 1:])
        tr.engine.backward(out.loss, 1, last=True)
        tr.engine.reduce_and_clip(1.0)
        grads = measured_bytes(tr.model, tr.engine.optimizer)["grad_bytes"]
        tr.engine.step(1e-3, 1.0, True)
        held = {**measured_bytes(tr.model, tr.engine.optimizer), "grad_bytes": grads}
        saved = {}
        if engine == "native":  # FSDP's gathered weights would count as saved tensors: the activations are the same
            for mode in MODES:
                cfg_mode = _config(engine, ep, mode)
                model = build_trainer(cfg_mode, layout).model
                skip = list(model.parameters()) + list(model.buffers())
                saved[mode] = activation_bytes(lambda: model(tokens[:, :-1], tokens[:, 1:]).loss, skip,
                                               checkpointed_modules(model, mode))
        if rank == 0:
            (out_dir / f"{engine}_ep{ep}.json").write_text(json.dumps({"held": held, "saved": saved}))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_plan_equals_what_a_real_run_holds(tmp_path, world_size):
    run_processes(_measure_worker, world_size, tmp_path, timeout_s=300)
    for engine, ep in LAYOUTS[world_size]:
        real = json.loads((tmp_path / f"{engine}_ep{ep}.json").read_text())
        planned = plan(_config(engine, ep), world_size, 1.0)
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            assert planned[key] == real["held"][key], f"world {world_size}, {engine}, ep {ep}: {key}"
        for mode, saved in real["saved"].items():
            estimate = plan(_config(engine, ep, mode), world_size, 1.0)["activation_bytes"]
            assert abs(estimate - saved) <= 0.15 * saved, f"world {world_size}, ep {ep}, {mode}: {estimate} vs {saved}"


def test_fsdp_shards_what_native_replicates():
    native, fsdp = plan(_config("native", 2), 4, 1.0), plan(_config("fsdp", 2), 4, 1.0)
    assert fsdp["param_bytes"] < native["param_bytes"] / 2  # dense over 4 ranks, experts over 2 replicas
    assert fsdp["optimizer_bytes"] < native["optimizer_bytes"] / 2
    assert plan(_config("native", 2, "full"), 4, 1.0)["activation_bytes"] < native["activation_bytes"]


def test_the_cli_plans_thousands_of_ranks_in_one_json_line():
    done = run_cli(["plan", "configs/gpu.yaml", "--nproc", "2048", "--gpu", "h100", "parallel.ep=16",
                    "train.engine=fsdp", "train.batch_size=2048", "train.activation_checkpointing=full"], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["fits"] is True and result["device_memory_bytes"] == 80 * 2**30
    assert result["total_bytes"] == sum(result[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes",
                                                            "activation_bytes"))
    summary = [line for line in done.stderr.splitlines() if line.startswith("plan: ")]
    assert len(summary) == 1 and "2048 ranks" in summary[0] and "fits" in summary[0]


@pytest.mark.parametrize("args, named", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "3"], "world size 3 is not divisible"),
    (["--nproc", "2", "--device-memory-gb", "-1"], "--device-memory-gb must be > 0"),
    (["--nproc", "4", "train.batch_size=6"], "train.batch_size"),
])
def test_bad_plan_input_is_one_line(args, named):
    done = run_cli(["plan", "configs/tiny.yaml", *args], timeout=60)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1 and named in errors[0], done.stderr[-2000:]
