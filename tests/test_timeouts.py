"""A missing or dead peer ends in an error that names where, never in a hang.

* Every group `make_layout` creates honours `parallel.timeout_s`: an all_reduce whose partner
  never joins raises `CollectiveError` after about that long, on the EP group and on the
  expert-data-parallel group, although the world group (120 s here) and torch's default
  (30 min) are far longer.
* A rank killed or stopped (SIGSTOP) mid-training: the survivor, a launcher-less CLI rank,
  exits 1 with one line naming its rank, the step and the operation, within parallel.timeout_s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from trainer.config import ParallelConfig
from trainer.moe.collectives import CollectiveError, all_reduce_sum_
from trainer.parallel.dist import make_layout

from .cli import REPO
from .distributed import free_port, run_processes

GROUP_TIMEOUT_S = 2
# far above the expected ~2 s, far below the time an idle partner keeps its process (and its
# sockets) alive: without the group timeout rank 0 would wait for that partner to exit
BOUND_S = 12
PARTNER_WAIT_S = 25


def _timeout_worker(rank, world_size, done_file):
    layout = make_layout(ParallelConfig(ep=2, timeout_s=GROUP_TIMEOUT_S), torch.device("cpu"))
    dist.barrier()  # everyone has built the layout: only the collectives below can be late
    if rank == 0:
        elapsed = {}
        for name, group in (("EP", layout.ep_group), ("expert-data-parallel", layout.expert_dp_group)):
            start = time.monotonic()
            with pytest.raises(CollectiveError, match=rf"timeout test: all_reduce on the {name} group failed: "):
                all_reduce_sum_(torch.ones(3), group, "timeout test", f"all_reduce on the {name} group")
            elapsed[name] = time.monotonic() - start
        open(done_file, "w").close()
        for name, seconds in elapsed.items():
            assert seconds < BOUND_S, f"{name} group: rank 0 waited {seconds:.1f}s, parallel.timeout_s={GROUP_TIMEOUT_S}"
    else:
        # rank 1 (EP partner) and rank 2 (expert-data-parallel partner) never join; they stay
        # alive until rank 0 is done, or PARTNER_WAIT_S if it never gets done
        deadline = time.monotonic() + PARTNER_WAIT_S
        while not os.path.exists(done_file) and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.mark.slow
def test_every_group_honours_parallel_timeout_s(tmp_path):
    run_processes(_timeout_worker, 4, str(tmp_path / "rank0_done"), timeout_s=120.0)


SMALL = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
    "moe.num_experts=4", "moe.d_ff=32", "train.batch_size=4", "train.steps=100000", "train.eval_every=0",
    "train.eval_batches=1", "train.device=cpu", "run.progress=false", "run.log_every=1",
    "parallel.ep=2", "parallel.timeout_s=10", "data.dataset=files",
]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_peer_killed_or_stopped_mid_training_becomes_one_error_naming_the_step(tmp_path, sig):
    corpus = tmp_path / "corpus.txt"
    gen = torch.Generator().manual_seed(0)
    corpus.write_bytes(bytes((torch.randint(97, 123, (6000,), generator=gen)).tolist()))
    run_dir = tmp_path / "run"
    port = free_port()
    procs = []
    try:
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO),
                   "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "trainer", "train", "configs/tiny.yaml", *SMALL, f"data.path={corpus}",
                 f"run.dir={run_dir}"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        rank0, rank1 = procs
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().strip()):
            assert rank0.poll() is None and rank1.poll() is None, "a rank stopped before training"
            assert time.monotonic() < deadline, "no step was logged within 120 s"
            time.sleep(0.1)

        rank1.send_signal(sig)  # a stopped peer keeps its sockets open: only the timeout can notice
        killed = time.monotonic()
        try:
            _, err0 = rank0.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still runs 60 s after its peer was killed")
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    assert rank0.returncode == 1, err0[-3000:]
    errors = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err0[-3000:]
    match = re.fullmatch(r"error: rank 0: step (\d+): .* failed: .*", errors[0])
    assert match, errors[0]
    # every step is logged (run.log_every=1) once it completed: the step named is the one after the last logged
    last_logged = json.loads(metrics.read_text().strip().splitlines()[-1])["step"]
    assert int(match.group(1)) == last_logged + 1, (errors[0], last_logged)
    assert "Traceback" not in err0, err0[-3000:]
    # parallel.timeout_s=10 bounds the wait even when the kernel does not report the closed socket
    assert waited < 25, f"rank 0 took {waited:.1f}s to stop"
