"""CLI: `python -m trainer train CONFIG.yaml [key=value ...]`, alone or under torchrun."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config, validate
from .data import DataError
from .dist import env_world_size
from .moe.collectives import CollectiveError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _fail(message: str, code: int) -> int:
    # one write call: lines from several ranks sharing a pipe stay whole
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Expert-parallel MoE trainer.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train a model from a YAML config")
    train_cmd.add_argument("config", help="YAML file, e.g. configs/tiny.yaml")
    train_cmd.add_argument("overrides", nargs="*", metavar="key=value",
                           help="dotted overrides, e.g. moe.num_experts=16 train.steps=100")
    args = parser.parse_args(argv)

    # everything here runs before any process group exists, identically on every rank
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, env_world_size())
    except ConfigError as e:
        return _fail(f"config: {e}", EXIT_BAD_INPUT)

    from .train import RunDirError, train  # torch-heavy imports only once the config is good

    rank = os.environ.get("RANK", "0")
    try:
        train(cfg)
    except (RunDirError, DataError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except CollectiveError as e:
        return _fail(f"rank {rank}: {e}", EXIT_FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
