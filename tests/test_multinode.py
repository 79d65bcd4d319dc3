"""The multi-node launchers for real: launch/multinode.sh as two torchrun agents on this machine
(c10d rendezvous, one gloo worker each), a worker SIGKILLed under MAX_RESTARTS=1, and
launch/slurm.sbatch under stand-in `scontrol` and `srun` that start it on two "nodes".

Each run must log the same per-step losses, bit for bit, as one `torchrun --standalone
--nproc-per-node 2` run of the same config: the ranks, the layout, the data order and the
collectives are the same, only the rendezvous differs (a killed and restarted run resumes from a
checkpoint, and resume is exact).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from trainer.run.tracking import MetricsError, read_metrics

from .cli import REPO, run_cli
from .distributed import free_port

pytestmark = pytest.mark.slow

STEPS = 60
CKPT_EVERY = 10
CPU = ["parallel.backend=gloo", "train.device=cpu"]
MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "moe.num_experts=4",
         "moe.top_k=2", "moe.d_ff=48", "train.batch_size=8", "train.warmup_steps=5", "train.eval_every=0",
         "train.eval_batches=2", "run.log_every=1", "run.progress=false", "parallel.timeout_s=30",
         "parallel.ep=2", f"train.steps={STEPS}", f"ckpt.every={CKPT_EVERY}"]
TIMEOUT_S = 120  # one run takes 10-20 s on 2 cores


def losses(run_dir: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step is logged twice in {run_dir}: {sorted(steps)}"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def standalone(tmp_path_factory) -> dict[int, float]:
    """The reference: one `torchrun --standalone --nproc-per-node 2` run of the same config."""
    run_dir = tmp_path_factory.mktemp("standalone") / "run"
    result = run_cli(["train", "configs/tiny.yaml", *CPU, *MODEL, f"run.dir={run_dir}"], nproc=2, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


# ---- processes: every one started in its own session, and everything below it killed at the end ----

def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "pid (comm) state"
                found.append(int(entry.name))
    return found


def descendants_of(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        found += kids
        todo += kids
    return found


def env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


class Launched:
    """A launcher started with Popen in a session of its own, its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, deadline: float) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.log.name} still running after {TIMEOUT_S}s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """torchrun starts each worker in a session of its own, so a process group is not enough."""
        pids = descendants_of(self.proc.pid) if self.proc.poll() is None else []
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=30)


@pytest.fixture
def launch():
    started: list[Launched] = []

    def start(cmd: list[str], env: dict[str, str], log: Path) -> Launched:
        started.append(Launched(cmd, {**os.environ, "OMP_NUM_THREADS": "1", **env}, log))
        return started[-1]

    yield start
    for launched in started:  # on success they have all ended; on failure nothing outlives the test
        launched.kill()


def finish(launched: list[Launched]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    for one in launched:
        rc = one.wait(deadline)
        assert rc == 0, f"{one.log.name} exited {rc}:\n{one.output()[-3000:]}"


def start_two_nodes(launch, tmp_path: Path, run_dir: Path, max_restarts: int = 0) -> list[Launched]:
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RDZV_ID": f"test-{os.getpid()}-{time.monotonic_ns()}", "MAX_RESTARTS": str(max_restarts)}
    args = ["configs/tiny.yaml", *CPU, *MODEL, f"run.dir={run_dir}"]
    return [launch(["bash", "launch/multinode.sh", *args], env, tmp_path / f"node{node}.log") for node in range(2)]


def assert_same_losses(run_dir: Path, standalone: dict[int, float]) -> None:
    got = losses(run_dir)
    assert sorted(got) == sorted(standalone), f"steps differ: {sorted(set(got) ^ set(standalone))[:10]}"
    differ = {s: (got[s], standalone[s]) for s in standalone if got[s] != standalone[s]}
    assert not differ, f"{len(differ)} steps differ from the standalone run, e.g. {sorted(differ.items())[:3]}"


# ---- the tests ----

def test_two_multinode_agents_give_the_standalone_losses(tmp_path, standalone, launch):
    run_dir = tmp_path / "run"
    finish(start_two_nodes(launch, tmp_path, run_dir))
    assert_same_losses(run_dir, standalone)


def wait_for_checkpoint_and_step(run_dir: Path, step: int, agents: list[Launched]) -> None:
    checkpoint = run_dir / "checkpoints" / f"step_{CKPT_EVERY:07d}"  # published by a rename: complete if there
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if checkpoint.is_dir() and max(losses(run_dir), default=0) >= step:
                return
        except (FileNotFoundError, MetricsError):
            pass
        for agent in agents:
            assert agent.proc.poll() is None, f"{agent.log.name} ended before step {step}:\n{agent.output()[-3000:]}"
        time.sleep(0.02)
    pytest.fail(f"step {step} not reached in {TIMEOUT_S}s")


def worker_of_rank(agents: list[Launched], rank: int) -> int:
    for agent in agents:
        for pid in descendants_of(agent.proc.pid):
            try:
                env = env_of(pid)
            except OSError:
                continue
            if env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
                return pid
    pytest.fail(f"no worker of rank {rank} under the agents")


def test_a_worker_sigkilled_on_one_node_is_restarted_on_both_and_finishes_with_the_same_losses(
        tmp_path, standalone, launch):
    run_dir = tmp_path / "run"
    agents = start_two_nodes(launch, tmp_path, run_dir, max_restarts=1)
    wait_for_checkpoint_and_step(run_dir, CKPT_EVERY + 2, agents)
    os.kill(worker_of_rank(agents, 1), signal.SIGKILL)
    finish(agents)
    logs = [agent.output() for agent in agents]
    assert sum("exitcode: -9" in log for log in logs) == 1, "the kill did not land on one worker"
    # rank 0 prints for the run; the restarted run resumed, so the kill landed before the end
    assert "resuming from" in "".join(logs), "\n".join(log[-2000:] for log in logs)
    assert_same_losses(run_dir, standalone)  # also: each step logged exactly once, the final loss included


STAND_INS = {
    "scontrol": """#!/usr/bin/env bash
# stand-in: `scontrol show hostnames LIST` names this machine
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; exit 0; fi
echo "scontrol stand-in: unsupported: $*" >&2; exit 2
""",
    "srun": """#!/usr/bin/env bash
# stand-in: one task on each of SLURM_NNODES "nodes", all on this machine; fails if any fails
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_NNODES "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
""",
}


def test_the_slurm_script_under_stand_in_scontrol_and_srun_gives_the_standalone_losses(tmp_path, standalone, launch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": str(time.monotonic_ns()), "SLURM_SUBMIT_DIR": str(REPO),
           "CONFIG": "configs/tiny.yaml", "NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port())}
    job = launch(["bash", "launch/slurm.sbatch", *CPU, *MODEL, f"run.dir={run_dir}"], env, tmp_path / "job.log")
    finish([job])
    assert "resuming from" not in job.output()
    assert_same_losses(run_dir, standalone)
