"""What a run reports: `metrics.jsonl` (always, rank 0), wandb (optional), a progress bar,
and the assembly of each step's statistics into the record that goes there."""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

import torch
import yaml
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


_console_log: Optional[TextIO] = None  # set only inside `console_log`, which always resets it


def print0(is_main: bool, message: str) -> None:
    """Print once per run (rank 0), without breaking a progress bar; inside `console_log`, the
    line also goes to the run's train.log."""
    if is_main:
        tqdm.write(message, file=sys.stderr)
        if _console_log is not None:
            _console_log.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")


@contextmanager
def console_log(path: Optional[Path]) -> Iterator[None]:
    """Within the block, rank 0's console lines are appended to `path` (None: nowhere), and an
    exception that ends the block is written there as the `error:` line the console shows."""
    global _console_log
    if path is None:
        yield
        return
    with open(path, "a", buffering=1) as f:
        _console_log = f
        try:
            yield
        except Exception as e:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] error: {e}\n")
            raise
        finally:
            _console_log = None


def git_commit(path: Path = Path(__file__).parent) -> Optional[str]:
    """The commit of the checkout this code runs from ("abc1234", "+ changes" when dirty), or None."""
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                                           timeout=10)
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


class MetricsError(ValueError):
    """metrics.jsonl is damaged; the message names the file and the line."""


def _metrics_lines(path: Path) -> list[str]:
    """The file's lines (FileNotFoundError if there is none); MetricsError at a line that is not text."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = []
    for number, line in enumerate(raw.splitlines(keepends=True), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise MetricsError(f"{path}: line {number} is not UTF-8 text, so the file is damaged; move it aside to "
                               "go on without the run's logged history") from None
    return lines


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records a run wrote to `run_dir/metrics.jsonl`; FileNotFoundError if it wrote none,
    MetricsError if it is damaged (a last line cut short by a kill is left out)."""
    path = Path(run_dir) / METRICS_FILE
    lines = _metrics_lines(path)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) and not line.endswith("\n"):
                break  # the record being written when the run was killed
            raise MetricsError(f"{path}: line {number} is not a JSON record, so the file is damaged") from None
    return records


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Keep the records of steps <= `step` (a resumed run's checkpoint); lines a dead run wrote
    after it are dropped, so each step is logged once. Atomic: a new file replaces the old.
    Returns how many lines were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    lines = _metrics_lines(path)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    partial = path.with_name(METRICS_FILE + ".partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)
    return len(lines) - len(kept)


class StepStats:
    """Sums over the micro-batches of one optimizer step, kept on the device until read."""

    def __init__(self, device: torch.device):
        self.losses = torch.zeros(4, dtype=torch.float64, device=device)  # loss, lm, aux, z
        self.dropped = torch.zeros((), dtype=torch.float64, device=device)
        self.routes = torch.zeros((), dtype=torch.float64, device=device)
        self.load_max = torch.zeros((), dtype=torch.float64, device=device)  # busiest / mean, worst layer
        self.routed_LE: Optional[torch.Tensor] = None  # routes per expert of each MoE layer, global
        self.entropy_L: Optional[torch.Tensor] = None  # router entropy summed over THIS rank's valid tokens
        self.valid_L: Optional[torch.Tensor] = None  # valid tokens of each MoE layer, global

    def add(self, out, micro_batches: int) -> None:
        """`out` is a `trainer.model.ModelOutput` of one micro-batch."""
        self.losses += torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().double() / micro_batches
        for s in out.moe_stats:  # already summed over every rank by the MoE layer
            self.dropped += s.dropped
            self.routes += s.routes
            load = s.routed_E.double()
            self.load_max = torch.maximum(self.load_max, load.max() / load.mean().clamp(min=1e-9))
        if out.moe_stats:
            routed_LE = torch.stack([s.routed_E for s in out.moe_stats]).long()
            entropy_L = torch.stack([s.entropy_sum for s in out.moe_stats]).double()
            valid_L = torch.stack([s.valid_tokens for s in out.moe_stats]).double()
            first = self.routed_LE is None
            self.routed_LE = routed_LE if first else self.routed_LE + routed_LE
            self.entropy_L = entropy_L if first else self.entropy_L + entropy_L
            self.valid_L = valid_L if first else self.valid_L + valid_L

    def routing_summary(self) -> torch.Tensor:
        """[dropped fraction, worst load ratio], identical on every rank."""
        return torch.stack([self.dropped / self.routes.clamp(min=1), self.load_max])


class RoutingWindow:
    """Per-layer routing over the steps since the last log line: load spread, dead experts,
    router entropy. Bounded in size: the worst layer and the mean over layers; per-expert
    counts only when asked (`run.log_expert_counts`)."""

    def __init__(self) -> None:
        self.routed_LE: Optional[torch.Tensor] = None
        self.entropy_L: Optional[torch.Tensor] = None
        self.steps = 0

    def add(self, routed_LE: Optional[torch.Tensor], entropy_L: Optional[torch.Tensor]) -> None:
        """One step's global routes per expert [L, E] and mean router entropy [L] (host tensors)."""
        if routed_LE is None:
            return
        self.routed_LE = routed_LE.clone() if self.routed_LE is None else self.routed_LE + routed_LE
        self.entropy_L = entropy_L.clone() if self.entropy_L is None else self.entropy_L + entropy_L
        self.steps += 1

    def summary(self, per_expert: bool = False) -> dict:
        """The window's fields for `metrics.jsonl` ({} for a dense model), then a fresh window."""
        if self.routed_LE is None:
            return {}
        load_LE = self.routed_LE.double()
        cv_L = load_LE.std(dim=1, unbiased=False) / load_LE.mean(dim=1).clamp(min=1e-12)
        dead_L = (self.routed_LE == 0).sum(dim=1).double()
        entropy_L = self.entropy_L / self.steps
        record = {"expert_load_cv": cv_L.max().item(), "expert_load_cv_mean": cv_L.mean().item(),
                  "dead_experts": int(dead_L.max().item()), "dead_experts_mean": dead_L.mean().item(),
                  "router_entropy": entropy_L.mean().item(), "router_entropy_min": entropy_L.min().item()}
        if per_expert:
            record["expert_counts"] = self.routed_LE.tolist()
        self.__init__()
        return record


LOSS_FIELDS = ("loss", "lm_loss", "aux_loss", "z_loss")


def train_record(step: int, losses: list[float], grad_norm: float, lr: float, routing: list[float],
                 tokens_per_s: float, epoch: float, elapsed_s: float, skipped_steps: int,
                 mfu: Optional[float]) -> dict:
    """The `metrics.jsonl` line of a logged training step (README: metrics table)."""
    record = {"step": step, **dict(zip(LOSS_FIELDS, losses)), "grad_norm": grad_norm, "lr": lr,
              "tokens_per_s": tokens_per_s, "dropped_frac": routing[0], "expert_load_max": routing[1],
              "epoch": epoch, "elapsed_s": elapsed_s, "skipped_steps": skipped_steps}
    if mfu is not None:
        record["mfu"] = mfu
    return record


def eval_record(step: int, val_loss: float) -> dict:
    """An evaluation's line: only what the evaluation measured, so nothing stale is repeated."""
    return {"step": step, "val_loss": val_loss}


class Tracker:
    """Rank 0 writes one JSON object per logged step to metrics.jsonl, and to wandb or tensorboard
    when `run.tracker` asks; other ranks do nothing."""

    def __init__(self, run_dir: Path, is_main: bool, tracker: str, project: str, name: Optional[str],
                 config: dict, resumed_step: int = 0):
        self.is_main = is_main
        self._file = None
        self._wandb = None
        self._tensorboard = None
        if not is_main:
            return
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1)
        if tracker == "wandb":
            self._wandb = _start_wandb(run_dir, project, name, config)
        elif tracker == "tensorboard":
            self._tensorboard = _start_tensorboard(run_dir, config, resumed_step)

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        record = {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps(record) + "\n")
        # numbers only: per-expert count lists stay in metrics.jsonl, not as many tracker keys
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _start_wandb(run_dir: Path, project: str, name: Optional[str], config: dict):
    try:
        import wandb
    except ImportError:
        raise RuntimeError("run.tracker=wandb needs the wandb package: run `bash launch/setup.sh --wandb`") from None
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    if "WANDB_MODE" not in os.environ and not has_key:
        os.environ["WANDB_MODE"] = "offline"
        print0(True, f"wandb: no API key found, logging offline under {run_dir}/wandb (upload later with `wandb sync`)")
    # one wandb run per run.dir: a resumed run continues it instead of starting another
    id_file = run_dir / "wandb_id.txt"
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(4) + "\n")  # wandb run ids are lower-case letters and digits
    return wandb.init(project=project, name=name, dir=str(run_dir), config=config, id=id_file.read_text().strip(),
                      resume="allow")


def _start_tensorboard(run_dir: Path, config: dict, resumed_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("run.tracker=tensorboard needs the tensorboard package: run "
                           "`bash launch/setup.sh --tensorboard`") from None
    # a resumed run drops what a dead run logged after its checkpoint, as metrics.jsonl does
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)
    writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")
    print0(True, f"tensorboard: logging under {run_dir / 'tensorboard'} (view with `tensorboard --logdir {run_dir}`)")
    return writer


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                file=sys.stderr, mininterval=1.0)
