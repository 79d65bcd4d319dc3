"""`train.compile`: compiled training equals eager training (per-step losses, gradient norms and
every parameter after the steps, fp32), in one process and with experts sharded over 2 gloo
processes; the modules keep their names; a missing C++ compiler is one line, not a traceback."""

from __future__ import annotations

import pytest
import torch

from trainer.build import build_trainer
from trainer.parallel.compile import compile_problem, compiled_modules
from trainer.parallel.dist import make_layout

from .cli import run_cli
from .distributed import run_processes
from .test_training_invariants import CPU, one_process_layout, random_steps, small_config

TOL = dict(rtol=1e-5, atol=1e-6)
needs_cpp_compiler = pytest.mark.skipif(compile_problem("cpu") is not None,
                                        reason=f"inductor cannot compile here: {compile_problem('cpu')}")
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)  # three AdamW steps amplify fp32 rounding in the first moments


def _train(cfg, layout, compile_: bool, steps: int = 3):
    cfg.train.compile = compile_
    tr = build_trainer(cfg, layout)
    results = random_steps(tr, steps, lr=3e-3)
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    return [r.losses for r in results], [r.grad_norm for r in results], params, tr.model


def _assert_same_training(eager, compiled):
    (losses_e, norms_e, params_e, _), (losses_c, norms_c, params_c, _) = eager, compiled
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), **TOL)
    torch.testing.assert_close(torch.tensor(norms_c), torch.tensor(norms_e), **TOL)
    assert params_c.keys() == params_e.keys()  # compiling renames nothing
    for name in params_e:
        torch.testing.assert_close(params_c[name], params_e[name], **PARAM_TOL, msg=name)


VARIANTS = {  # (moe settings, train settings)
    "dropless": ({}, {}),
    "capacity+shared+jitter": ({"capacity_factor": 1.0, "num_shared_experts": 1, "router_jitter": 0.1}, {}),
    "dense": ({"num_experts": 0}, {}),
    # compiled modules inside recomputed regions: the recompute must save what the forward saved
    "moe recompute+noisy": ({"noisy_topk": True}, {"activation_checkpointing": "moe"}),
    "full recompute+shared": ({"num_shared_experts": 1}, {"activation_checkpointing": "full"}),
}


@pytest.mark.slow
@needs_cpp_compiler
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_training_equals_eager_in_one_process(variant):
    def config():
        cfg = small_config(ep=1, batch_size=4)
        moe, train = VARIANTS[variant]
        for section, values in ((cfg.moe, moe), (cfg.train, train)):
            for key, value in values.items():
                setattr(section, key, value)
        return cfg

    eager = _train(config(), one_process_layout(), False)
    compiled = _train(config(), one_process_layout(), True)
    model = compiled[3]
    assert compiled_modules(model) and all(m._compiled_call_impl is not None for m in compiled_modules(model))
    _assert_same_training(eager, compiled)


def _sharded_worker(rank, world_size):
    layouts = [make_layout(small_config(ep=2, batch_size=8).parallel, CPU) for _ in range(2)]
    eager = _train(small_config(ep=2, batch_size=8), layouts[0], False)
    compiled = _train(small_config(ep=2, batch_size=8), layouts[1], True)
    _assert_same_training(eager, compiled)


@pytest.mark.slow
@needs_cpp_compiler
def test_compiled_training_equals_eager_with_experts_sharded_over_2_processes():
    run_processes(_sharded_worker, 2, timeout_s=600)


def test_a_missing_cpp_compiler_is_one_line(tmp_path):
    proc = run_cli(["train", "configs/tiny.yaml", "train.compile=true", "parallel.ep=1", f"run.dir={tmp_path / 'run'}"],
                   env={"CXX": str(tmp_path / "no-such-compiler")}, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config: train.compile: inductor needs a C++ compiler")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_training_equals_eager_on_cuda_in_bf16():
    from trainer.parallel.dist import Layout

    def config():
        cfg = small_config(ep=1, batch_size=4)
        cfg.train.device, cfg.train.dtype = "cuda", "bf16"
        return cfg

    cuda = Layout(0, 1, 0, 1, torch.device("cuda"), None, None, None)
    eager = _train(config(), cuda, False)
    compiled = _train(config(), cuda, True)
    torch.testing.assert_close(torch.tensor(compiled[0]), torch.tensor(eager[0]), rtol=2e-2, atol=2e-2)
