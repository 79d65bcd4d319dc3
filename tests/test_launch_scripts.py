"""What a new user meets first: the launch scripts' --help, multinode.sh on a machine without
GPUs, and README commands that do what they say when pasted in order."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from .cli import REPO

SCRIPTS = ["cpu", "gpu_node", "multinode", "accelerate", "deepspeed"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_launch_script_prints_its_own_usage_and_starts_nothing(script, flag):
    started = time.monotonic()
    result = subprocess.run(["bash", f"launch/{script}.sh", flag], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "NNODES": "2", "MASTER_ADDR": "localhost"})
    assert result.returncode == 0, result.stderr
    assert f"launch/{script}.sh" in result.stdout and "Usage:" in result.stdout, result.stdout
    assert "python -m trainer" not in result.stdout and "key=value ..." in result.stdout  # ours, not the CLI's
    assert not result.stdout.lstrip().startswith("#") and "set -euo" not in result.stdout
    assert time.monotonic() - started < 10, "it started something"


def _path_without_nvidia_smi(tmp_path) -> str:
    """PATH with bash and the usual tools but no nvidia-smi, even on a GPU machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname", "wc", "sed", "cat"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    return str(bin_dir)


def test_multinode_without_gpus_says_what_it_needs(tmp_path):
    env = {**os.environ, "NNODES": "2", "MASTER_ADDR": "localhost", "PATH": _path_without_nvidia_smi(tmp_path)}
    env.pop("NPROC_PER_NODE", None)
    result = subprocess.run([shutil.which("bash"), "launch/multinode.sh", "configs/tiny.yaml"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "NPROC_PER_NODE" in result.stderr and "no GPU" in result.stderr


def _run_dir(command: str) -> str:
    match = re.search(r"run\.dir=(\S+)", command)
    assert match, command
    return match.group(1)


def test_the_readmes_which_is_commands_train_a_run_of_their_own():
    lines = (REPO / "README.md").read_text().splitlines()
    pairs = [(lines[i - 1], lines[i + 1]) for i, line in enumerate(lines) if line.startswith("# which is")]
    assert len(pairs) >= 2
    for first, second in pairs:  # pasted in order, a shared run.dir would resume the first and train nothing
        assert _run_dir(first) != _run_dir(second), (first, second)


def test_the_slurm_examples_logs_are_ignored():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", "logs/moe-trainer-1234.out"], cwd=REPO).returncode == 0
