"""The one `error:` line is never lost, and interrupting or pulling run.dir away is one line too.

An error that is the same on every rank is printed once per machine by whichever rank gets
there first (`trainer/run/error_once.py`). The planted fault is a rank 0 that is slow to
print: a launcher stops the other workers as soon as one exits, so a rank-0-only printer is
killed before it writes anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cli import REPO
from .distributed import free_port
from .test_guards_cli import SMALL, TINY, corpus, error_lines, files_data, one_process  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

SLOW_RANK_0 = """
import os, sys, time
import trainer.__main__ as cli

real = cli._fail


def slow_rank_0(message, code, every_rank=False):  # planted: rank 0 reaches its error line late
    if os.environ.get("RANK") == "0":
        time.sleep(float(os.environ["RANK_0_DELAY_S"]))
    return real(message, code, every_rank)


cli._fail = slow_rank_0
sys.exit(cli.main(sys.argv[1:]))
"""

BAD_BATCH = "train.batch_size=3"  # not divisible by 2 processes: the same config error on every rank


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RANK_0_DELAY_S": "8", **extra}


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "slow_rank_0.py"
    path.write_text(SLOW_RANK_0)
    return path


def test_a_slow_rank_0_under_torchrun_still_leaves_exactly_one_error_line(tmp_path, corpus):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(_script(tmp_path)), "train", TINY, *SMALL, *files_data(corpus), BAD_BATCH,
                             f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "train.batch_size" in lines[0], result.stderr[-3000:]
    assert time.monotonic() - started < 8 + 20, "torchrun waited for the delayed rank 0 instead of stopping it"


def _by_hand(tmp_path: Path, corpus: Path, port: int) -> list[str]:
    """Both ranks started by hand; when the first exits, the other is killed, as a launcher would."""
    procs = [subprocess.Popen([sys.executable, str(_script(tmp_path)), "train", TINY, *SMALL, *files_data(corpus),
                               BAD_BATCH, f"run.dir={tmp_path / 'run'}"], cwd=REPO,
                              env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)), stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [line for p in procs for line in error_lines(p.communicate(timeout=60)[1])]


def test_a_slow_rank_0_launched_by_hand_still_leaves_exactly_one_error_line_at_every_launch(tmp_path, corpus):
    port = free_port()
    for launch in range(2):  # the same address and port again: the first launch's claim is not this one's
        lines = _by_hand(tmp_path, corpus, port)
        assert len(lines) == 1 and "train.batch_size" in lines[0], f"launch {launch}: {lines}"
        time.sleep(0.2)  # a person takes longer to launch again


def test_ctrl_c_during_start_up_is_one_line_and_130_and_changes_nothing(tmp_path, corpus):
    import fcntl

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = ["train", TINY, *SMALL, *files_data(corpus), f"data.cache_dir={cache}", "parallel.timeout_s=120"]
    built = subprocess.run([sys.executable, "-m", "trainer", *args, f"run.dir={tmp_path / 'first'}"], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (lock,) = (cache / "tokens").glob("*.lock")
    entry = lock.with_suffix("")
    saved = {p.name: p.read_bytes() for p in entry.iterdir()}
    os.rename(entry, tmp_path / "aside")  # start-up will wait for the cache lock, which this test holds
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        child = subprocess.Popen([sys.executable, "-m", "trainer", *args, f"run.dir={run_dir}"], cwd=REPO, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (run_dir / ".lock").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # run.dir is locked: start-up has begun
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        try:
            _, stderr = child.communicate(timeout=60)
        finally:
            child.kill()
    assert child.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1 and "interrupted" in error_lines(stderr)[0], stderr
    assert not (run_dir / "metrics.jsonl").exists()
    os.rename(tmp_path / "aside", entry)
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == saved
    rerun = subprocess.run([sys.executable, "-m", "trainer", *args, f"run.dir={run_dir}"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]  # the lock was let go


@pytest.mark.parametrize("then", ["deleted", "replaced"])
def test_run_dir_pulled_away_during_training_stops_the_run_with_a_line_saying_what_was_lost(tmp_path, corpus, then):
    run_dir = tmp_path / "run"
    args = ["train", TINY, *SMALL, *files_data(corpus), "train.steps=100000", "run.log_every=5", "ckpt.every=20",
            f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}"]
    child = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step_0000020").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        aside = tmp_path / "aside"
        os.rename(run_dir, aside)  # as `rm -rf` would, but keep it to look at
        if then == "replaced":
            run_dir.mkdir()
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()  # a run that did not stop would train for 100000 steps
    assert child.returncode == 1, stderr[-2000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith(f"error: run.dir: {run_dir} was {'deleted' if then == 'deleted' else 'replaced'}")
    assert "metrics.jsonl" in lines[0] and "newest at step 20" in lines[0]
    assert "done:" not in stderr
    assert list(run_dir.iterdir()) == [] if then == "replaced" else not run_dir.exists()  # nothing written anew
    logged = [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) < 100000
