"""What the launcher (torchrun, accelerate, deepspeed, a Slurm script) says about this process:
WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, checked once by the
CLI before anything reads them. Imports nothing heavy (no torch), so the CLI starts fast."""

from __future__ import annotations

import os


class LaunchError(ValueError):
    """The launcher's environment variables cannot describe this process; the message names one."""


def _whole_number(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not a whole number (it is set by the launcher, e.g. torchrun)") from None
    if value < minimum:
        raise LaunchError(f"{name}={value} must be >= {minimum}")
    return value


def check_launch_env() -> None:
    """What a launcher (torchrun, accelerate, deepspeed, a Slurm script) says about this process,
    checked before anything reads it: one LaunchError naming the variable."""
    world, rank = _whole_number("WORLD_SIZE", 1, 1), _whole_number("RANK", 0, 0)
    _whole_number("LOCAL_RANK", 0, 0)
    _whole_number("LOCAL_WORLD_SIZE", world, 1)
    if rank >= world:
        raise LaunchError(f"RANK={rank} must be below WORLD_SIZE={world}")
    if world == 1:
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise LaunchError(f"{name} is not set, but WORLD_SIZE={world} and RANK={rank} say this is one of {world} "
                              "processes: launch with torchrun (launch/cpu.sh), or, in a shell left over from a torchrun "
                              "session, `unset WORLD_SIZE RANK LOCAL_RANK LOCAL_WORLD_SIZE` to run one process")
    port = os.environ["MASTER_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"MASTER_PORT={port!r} is not a TCP port (1-65535)")


def env_world_size() -> int:
    """World size as the launcher announces it, readable before any process group exists
    (`check_launch_env` has vetted it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))
