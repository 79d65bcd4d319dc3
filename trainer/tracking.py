"""What a run reports: `metrics.jsonl` (always, rank 0), wandb (optional), a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def print0(is_main: bool, message: str) -> None:
    """Print once per run (rank 0), without breaking a progress bar."""
    if is_main:
        tqdm.write(message, file=sys.stderr)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records a run wrote to `run_dir/metrics.jsonl`; FileNotFoundError if it wrote none."""
    with open(Path(run_dir) / METRICS_FILE) as f:
        return [json.loads(line) for line in f if line.strip()]


class Tracker:
    """Rank 0 writes one JSON object per logged step; other ranks do nothing."""

    def __init__(self, run_dir: Path, is_main: bool, tracker: str, project: str, name: Optional[str],
                 config: dict):
        self.is_main = is_main
        self._file = None
        self._wandb = None
        if not is_main:
            return
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1)
        if tracker == "wandb":
            self._wandb = _start_wandb(run_dir, project, name, config)

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        record = {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, project: str, name: Optional[str], config: dict):
    try:
        import wandb
    except ImportError:
        raise RuntimeError("run.tracker=wandb needs the wandb package: pip install -e '.[wandb]'") from None
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    if "WANDB_MODE" not in os.environ and not has_key:
        os.environ["WANDB_MODE"] = "offline"
        print0(True, f"wandb: no API key found, logging offline under {run_dir}/wandb (upload later with `wandb sync`)")
    return wandb.init(project=project, name=name, dir=str(run_dir), config=config)


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                file=sys.stderr, mininterval=1.0)
