"""Run the real CLI, alone or under torchrun, and read what a run wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], nproc: int = 1, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS`, under `torch.distributed.run --nproc-per-node nproc` when nproc > 1."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "trainer", *args]
    else:
        cmd = [sys.executable, "-m", "trainer", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
