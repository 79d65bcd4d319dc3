"""Ranks agree before they train (DESIGN invariant 7), or every rank stops with one line.

* Two launcher-less CLI ranks (RANK/WORLD_SIZE/MASTER_* set by hand, a real gloo group), one
  setting apart: both exit 2, rank 0 alone prints `error: ranks started with different settings`
  naming the key and the ranks.
* `verdict` on hand-built reports.
* `check_replicas_identical` on real gloo processes: one ulp on one rank is caught on every rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.build import build_model
from trainer.config import Config
from trainer.moe.experts import expert_parameters
from trainer.parallel.dist import make_layout
from trainer.run.agreement import ReplicaMismatchError, StartReport, check_replicas_identical, verdict

from .cli import REPO
from .distributed import free_port, run_processes

SMALL = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.seq_len=32",
    "moe.num_experts=4", "moe.d_ff=32", "train.batch_size=4", "train.steps=2", "train.eval_every=0",
    "train.eval_batches=1", "train.device=cpu", "run.progress=false", "parallel.ep=2", "parallel.timeout_s=60",
    "data.dataset=files",
]


def write_corpus(path: Path, alphabet: str, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(alphabet), (6000,), generator=gen).tolist()
    path.write_text("".join(alphabet[i] for i in idx))
    return path


def launch_ranks(args_per_rank: list[list[str]], cwd_per_rank: list[Path], timeout: float = 180):
    """Start one `python -m trainer` per rank, launcher-less: the env a launcher would set, by hand."""
    port, world = free_port(), len(args_per_rank)
    procs = []
    for rank, (args, cwd) in enumerate(zip(args_per_rank, cwd_per_rank)):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


# (extra override on rank 1, what rank 0's line must name)
DIFFERENCES = [
    ("train.lr=0.001", "train.lr"),
    ("train.seed=7", "train.seed"),
    ("moe.top_k=1", "moe.top_k"),
    ("moe.d_ff=64", "moe.d_ff"),
    ("model.n_heads=2", "model.n_heads"),
    ("train.grad_clip=0.5", "train.grad_clip"),
    ("parallel.ep=1", "parallel.ep"),  # 4 experts and 2 ranks divide by both 1 and 2
    ("DIFFERENT_FILE", "data.path"),  # another file: the path and the fingerprint differ
    ("SAME_PATH_OTHER_BYTES", "data (corpus fingerprint"),  # same relative path, other cwd: only the bytes differ
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, key", DIFFERENCES, ids=[d[0] for d in DIFFERENCES])
def test_ranks_with_different_settings_stop_with_one_line(tmp_path, extra, key):
    cwd = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in cwd:
        d.mkdir()
    config = str(REPO / "configs" / "tiny.yaml")
    if extra == "SAME_PATH_OTHER_BYTES":
        write_corpus(cwd[0] / "corpus.txt", "abcdefgh ij\n", 0)
        write_corpus(cwd[1] / "corpus.txt", "abcdefgh ij\n", 1)
        data = [["data.path=corpus.txt"], ["data.path=corpus.txt"]]
    else:
        a = write_corpus(tmp_path / "a.txt", "abcdefgh ij\n", 0)
        b = write_corpus(tmp_path / "b.txt", "klmnop qrs\n", 1)
        data = [[f"data.path={a}"], [f"data.path={b if extra == 'DIFFERENT_FILE' else a}"]]
    rank1_extra = [] if extra in ("DIFFERENT_FILE", "SAME_PATH_OTHER_BYTES") else [extra]
    common = ["train", config, *SMALL, f"run.dir={tmp_path / 'run'}"]
    (rc0, _, err0), (rc1, _, err1) = launch_ranks([common + data[0], common + data[1] + rank1_extra], cwd)

    assert (rc0, rc1) == (2, 2), f"exit codes {rc0}, {rc1}\nrank 0:\n{err0[-2000:]}\nrank 1:\n{err1[-2000:]}"
    # printed once, by whichever rank got there first (trainer/run/error_once.py), and nothing else
    printed = [[line for line in err.splitlines() if line.strip()] for err in (err0, err1)]
    assert sorted(map(len, printed)) == [0, 1], f"one line from the two ranks together, got:\n{err0}\n---\n{err1}"
    line = (printed[0] or printed[1])[0]
    assert line.startswith("error: ranks started with different settings"), line
    assert key in line and "on rank 0" in line and "on rank 1" in line, line
    if extra == "SAME_PATH_OTHER_BYTES":
        assert "data.path" not in line, line  # the configs agree; only the corpus fingerprint tells them apart
    if extra == "DIFFERENT_FILE":
        assert "data (corpus fingerprint" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


# ----------------------------------------------------------------------------- verdict


def report(problem=None, **config):
    return StartReport({"train.lr": 0.003, "moe.top_k": 2, **config}, "fp-a", problem)


def test_verdict_identical_reports_agree():
    assert verdict([report(), report(), report()]) is None


def test_verdict_names_the_one_rank_with_a_problem():
    line = verdict([report(), report("run.dir: /x is not writable"), report()])
    assert line == "rank 1: run.dir: /x is not writable"


def test_verdict_shared_problem_is_printed_as_is():
    problem = "data.path: /x is neither a file nor a directory"
    assert verdict([report(problem), report(problem)]) == problem


def test_verdict_names_keys_and_fingerprints_with_their_ranks():
    reports = [report(), report(**{"moe.top_k": 1}), StartReport(report().config, "fp-b")]
    line = verdict(reports)
    assert line.startswith("ranks started with different settings")
    assert "moe.top_k (2 on ranks 0,2; 1 on rank 1)" in line
    assert "data (corpus fingerprint 'fp-a' on ranks 0,1; 'fp-b' on rank 2)" in line
    assert "train.lr" not in line


# ----------------------------------------------------------------------------- replicas


def small_config(ep: int) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len = 32, 2, 2, 16
    cfg.moe.num_experts, cfg.moe.d_ff = 4, 32
    cfg.parallel.ep = ep
    return cfg


def nudge_one_ulp(p: torch.Tensor) -> None:
    assert p.dtype == torch.float32
    with torch.no_grad():
        p.view(-1).view(torch.int32)[0] += 1


def _replica_worker(rank, world_size, ep):
    cfg = small_config(ep)
    layout = make_layout(cfg.parallel, torch.device("cpu"))
    model = build_model(cfg, layout)
    experts = expert_parameters(model)
    params = dict(model.named_parameters())
    check_replicas_identical(model, experts, layout.world_group, layout.expert_dp_group)  # fresh: identical

    dense_name = "blocks.1.attn.qkv.weight"
    saved = params[dense_name].detach().clone()
    if rank == 1:
        nudge_one_ulp(params[dense_name])
    with pytest.raises(ReplicaMismatchError) as caught:
        check_replicas_identical(model, experts, layout.world_group, layout.expert_dp_group)
    message = str(caught.value)
    assert dense_name in message and "rank 1" in message, message
    with torch.no_grad():
        params[dense_name].copy_(saved)
    check_replicas_identical(model, experts, layout.world_group, layout.expert_dp_group)  # restored

    if layout.num_replicas > 1:  # an expert differs between its replicas (ranks 0 and 2 hold experts 0, 1)
        expert_name = "blocks.0.ffn.experts.w3_LFD"
        assert any(params[expert_name] is p for p in experts)
        if rank == 2:
            nudge_one_ulp(params[expert_name])
        with pytest.raises(ReplicaMismatchError) as caught:  # on every rank, also those holding other experts
            check_replicas_identical(model, experts, layout.world_group, layout.expert_dp_group)
        message = str(caught.value)
        assert expert_name in message and "rank 2" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_a_one_ulp_difference_between_replicas_stops_every_rank(world_size):
    run_processes(_replica_worker, world_size, 2)
