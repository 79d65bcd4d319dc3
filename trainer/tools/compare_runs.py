"""What `compare` is made of: its configs (parsed, loaded, checked to train on the same tokens),
one run per (config, seed) in a child process with its reuse and resume, and their figures
tabulated (paired by seed). `compare.py` puts them together; `equal_time.py` and `horizons.py`
run them again under other step counts."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..config import Config, ConfigError, load_config
from ..config_validation import validate

# what makes two runs comparable: a config may differ in anything else (its model, router, lr ...)
MATCHED_KEYS = ("train.steps", "train.batch_size", "train.grad_accum", "train.seed", "train.eval_every",
                "train.eval_batches", "model.seq_len", "model.vocab_size", "data")
# a run.dir left by an earlier comparison is reused if its config matches in everything but these:
# what compare sets itself, and what cannot change a result (logging, checkpoints, timeouts)
NOT_IDENTITY = ("train.seed", "run.", "ckpt.", "parallel.timeout_s", "parallel.debug_splits")
RUN_RECORD = "compare_run.json"


class CompareError(ValueError):
    """Bad arguments or configs that cannot be compared; one line."""


class RunFailedError(CompareError):
    """A training run exited non-zero; the runs finished before it are kept."""


class CompareInterrupted(CompareError):
    """Ctrl-C: the run in progress saved a checkpoint; the same command resumes."""


@dataclass
class Entry:
    """One config of the comparison: its file, its own overrides and the label it is shown under."""

    path: str
    overrides: list[str]
    label: str
    cfg: Config = field(repr=False, default=None)

    @property
    def slug(self) -> str:
        """The label as a directory name: "moe aux_loss_coef=0.001" -> "moe-aux_loss_coef-0.001"."""
        return re.sub(r"[^A-Za-z0-9._]+", "-", self.label)


@dataclass
class SeedResult:
    seed: int
    val_loss: float
    val_curve: list[tuple[int, float]]
    tokens_per_s: float
    wall_s: float


def parse_items(items: list[str]) -> tuple[list[Entry], list[str]]:
    """Split the positional arguments into configs (`FILE.yaml[:k=v,k=v]`) and common overrides."""
    entries, common = [], []
    for item in items:
        path, _, own = item.partition(":")
        if (path.endswith((".yaml", ".yml")) and "=" not in path) or Path(path).is_file():
            overrides = [o for o in own.split(",") if o] if own else []
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise CompareError(f"compare: {item}: after the colon come key=value overrides separated by commas, "
                                   f"not {bad[0]!r}")
            # "moe aux_loss_coef=0.001": the file's stem, then each override without its section
            label = " ".join([Path(path).stem, *(o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[1]
                                                 for o in overrides)])
            entries.append(Entry(path, overrides, label))
        elif "=" in item:
            common.append(item)
        else:
            raise CompareError(f"compare: {item} is neither a config file (.yaml) nor a key=value override")
    if not entries:
        raise CompareError("compare: name at least one config file")
    slugs = [e.slug for e in entries]
    for entry in entries:
        if slugs.count(entry.slug) > 1:
            raise CompareError(f"compare: two configs would share the run directory {entry.slug!r} (same file stem "
                               f"and overrides); rename one file")
    return entries, common


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_matched(entries: list[Entry]) -> None:
    """Refuse configs that would not train on the same tokens for the same steps."""
    first = entries[0]
    for entry in entries[1:]:
        for key in MATCHED_KEYS:
            a, b = _get(first.cfg, key), _get(entry.cfg, key)
            if a == b:
                continue
            if dataclasses.is_dataclass(a):  # a section: name the first key that differs
                name = next(f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name))
                key, a, b = f"{key}.{name}", getattr(a, name), getattr(b, name)
            raise CompareError(f"compare: {first.label} and {entry.label} differ in {key} ({a} vs {b}); a comparison "
                               f"trains every config on the same tokens: pass {key}=... to set it for all")


def load_entries(items: list[str], world_size: int) -> list[Entry]:
    """Parse, load and validate every config before anything trains: a typo costs nothing."""
    from ..run.preflight import preflight

    entries, common = parse_items(items)
    for entry in entries:
        try:
            entry.cfg = load_config(entry.path, [*common, *entry.overrides])
            validate(entry.cfg, world_size)
            preflight(entry.cfg, world_size)
        except ConfigError as e:
            raise CompareError(f"config: {entry.label}: {e}") from None
    for entry in entries:
        if entry.cfg.train.stop_at:
            raise CompareError(f"compare: {entry.label}: train.stop_at={entry.cfg.train.stop_at}: every run trains to "
                               f"train.steps (set train.steps instead)")
    check_matched(entries)
    return entries


def run_dir(out: Path, entry: Entry, seed: int) -> Path:
    return out / entry.slug / f"seed{seed}"


def check_run_dir_holds(directory: Path, cfg: Config) -> None:
    """A run.dir left by an earlier comparison must hold this very config, or its figures would lie."""
    saved_path = directory / "config.yaml"
    if not saved_path.is_file():
        return
    from ..run.agreement import flat_config  # the dotted keys ranks compare at start-up

    try:
        saved = flat_config(load_config(saved_path))
    except ConfigError as e:
        raise CompareError(f"compare: {directory} holds a run whose config cannot be read ({e}); remove it or pass "
                           f"another --out") from None
    wanted = flat_config(cfg)
    for key, value in wanted.items():
        if not key.startswith(NOT_IDENTITY) and saved.get(key) != value:
            raise CompareError(f"compare: {directory} holds a run with {key}={saved.get(key)}, this comparison wants "
                               f"{value}; remove it or pass another --out")


def run_records(directory: Path) -> list[dict]:
    """A run's metrics.jsonl records; a damaged file is one CompareError line."""
    from ..run.tracking import MetricsError, read_metrics

    try:
        return read_metrics(directory)
    except MetricsError as e:
        raise CompareError(f"compare: {e}") from None


def finished(directory: Path, steps: int) -> bool:
    from ..run.tracking import METRICS_FILE

    if not (directory / METRICS_FILE).is_file():
        return False
    return any(r["step"] == steps and r.get("val_loss") is not None for r in run_records(directory))


def restart_without_checkpoint(directory: Path, say: Callable[[str], None]) -> None:
    """A run stopped before its first checkpoint cannot resume (train refuses such a run.dir): its
    few steps are thrown away and it starts again, said in one line."""
    from ..run.checkpoint_files import complete_checkpoints
    from ..run.tracking import METRICS_FILE

    if (directory / METRICS_FILE).is_file() and not complete_checkpoints(directory):
        say(f"note: {directory} stopped before its first checkpoint; training it again from step 0")
        (directory / METRICS_FILE).unlink()


def train_command(entry: Entry, common: list[str], seed: int, directory: Path, nproc: int) -> list[str]:
    args = ["-m", "trainer", "train", entry.path, *common, *entry.overrides,
            f"train.seed={seed}", f"run.dir={directory}", "run.progress=false"]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def train_one(entry: Entry, common: list[str], seed: int, directory: Path, nproc: int) -> float:
    """Train (or resume) one run in a child process; its console goes to `directory/compare.log`.

    The child runs in a session of its own, so a Ctrl-C reaches compare only: compare then sends
    the child one SIGTERM, which makes it save a checkpoint after its current step and exit, and
    waits for that (a second Ctrl-C kills it instead)."""
    from ..run.checkpoint_files import complete_checkpoints

    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log, record = directory / "compare.log", directory / RUN_RECORD
    earlier = json.loads(record.read_text()).get("wall_s", 0.0) if record.is_file() else 0.0  # earlier attempts
    offset = log.stat().st_size if log.exists() else 0
    start = time.perf_counter()
    with open(log, "a") as console:
        child = subprocess.Popen(train_command(entry, common, seed, directory, nproc), env=env, stdout=console,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait()
            except KeyboardInterrupt:
                child.kill()
                raise
            outcome = "saved a checkpoint, and the same command resumes it" if complete_checkpoints(directory) else \
                "stopped before its first checkpoint, and the same command starts it again"
            raise CompareInterrupted(f"compare: interrupted; {entry.label} seed {seed} ({directory}) {outcome}") from None
        finally:
            wall = earlier + time.perf_counter() - start
            record.write_text(json.dumps({"wall_s": wall}))  # a (re)trained run: no final eval of it holds
    if rc != 0:
        with open(log, errors="replace") as console:
            console.seek(offset)  # this attempt's lines only: the log keeps every attempt
            lines = [line.strip() for line in console.read().splitlines() if line.strip()]
        ours = [line for line in lines if line.startswith("error:")]  # the trainer's own one-line errors
        reason = f": {(ours or lines or [''])[-1]}"
        raise RunFailedError(f"compare: training {entry.label} seed {seed} failed (exit {rc}); console in {log}{reason}")
    if not finished(directory, entry.cfg.train.steps):  # stopped by a signal from elsewhere: saved, exit 0
        raise RunFailedError(f"compare: {entry.label} seed {seed} stopped before step {entry.cfg.train.steps} (a "
                             f"signal?); the same command resumes it (console in {log})")
    return wall


def final_eval(directory: Path, eval_batches: int) -> float:
    """The run's final checkpoint evaluated over `eval_batches` validation batches (0 = the whole
    split) by `python -m trainer eval`, once: the result is kept in the run's compare record."""
    record_path = directory / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    cached = record.get("final_eval", {}).get(str(eval_batches))
    if cached is not None:
        return cached
    done = subprocess.run([sys.executable, "-m", "trainer", "eval", str(directory), f"train.eval_batches={eval_batches}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise RunFailedError(f"compare: evaluating {directory} failed (exit {done.returncode}): {lines[-1]}")
    val_loss = json.loads(done.stdout.strip().splitlines()[-1])["val_loss"]
    record.setdefault("final_eval", {})[str(eval_batches)] = val_loss
    record_path.write_text(json.dumps(record))
    return val_loss


def seed_result(directory: Path, seed: int, steps: int, eval_batches: Optional[int] = None) -> SeedResult:
    records = run_records(directory)
    curve = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]  # per logged interval
    record = directory / RUN_RECORD
    wall = json.loads(record.read_text())["wall_s"] if record.is_file() else records[-1].get("elapsed_s", math.nan)
    final = next(v for s, v in reversed(curve) if s == steps) if eval_batches is None else final_eval(directory,
                                                                                                     eval_batches)
    # the median interval: the warm-up after a start or a resume does not skew it
    return SeedResult(seed, final, curve, statistics.median(speeds) if speeds else math.nan, wall)


def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation; one seed has no spread (None)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(entries: list[Entry], results: dict[str, list[SeedResult]]) -> list[dict]:
    from ..build import full_model_on_meta

    base = {r.seed: r.val_loss for r in results[entries[0].label]}
    rows = []
    for entry in entries:
        runs = results[entry.label]
        mean, std = _mean_std([r.val_loss for r in runs])
        paired = [100 * (r.val_loss / base[r.seed] - 1) for r in runs]  # same seed: same init seed and data order
        rel, rel_std = _mean_std(paired)
        total, active = full_model_on_meta(entry.cfg).parameter_counts()
        rows.append({
            "config": entry.label, "file": entry.path, "overrides": entry.overrides,
            "val_loss_mean": mean, "val_loss_std": std, "rel_diff_pct": rel, "rel_diff_pct_std": rel_std,
            # timings: the median over seeds, so one run slowed by a busy machine does not skew them
            "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
            "active_params": active, "total_params": total,
            "wall_s": statistics.median(r.wall_s for r in runs),
            "seeds": [dataclasses.asdict(r) for r in runs],
        })
    return rows


def markdown(rows: list[dict], n_seeds: int, eval_batches: Optional[int] = None) -> str:
    first, spread = rows[0]["config"], n_seeds > 1  # one seed has no spread to show
    what = [f"mean ± std, {n_seeds} seeds" if spread else "1 seed"]
    if eval_batches is not None:  # the final checkpoints evaluated afterwards
        what.append("whole val split" if eval_batches == 0 else f"{eval_batches} val batch{'es' * (eval_batches > 1)}")
    loss_head = f"val loss ({', '.join(what)})"
    lines = [f"| config | {loss_head} | vs {first}{' (paired ± std)' if spread else ''} | tokens/s (median) | "
             f"active params | total params | wall time per run (median) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        loss = f"{row['val_loss_mean']:.4f}" + (f" ± {row['val_loss_std']:.4f}" if spread else "")
        rel = f"{row['rel_diff_pct']:+.2f}%" + (f" ± {row['rel_diff_pct_std']:.2f}" if spread else "")
        lines.append(f"| {row['config']} | {loss} | {rel} | {row['tokens_per_s']:,.0f} | "
                     f"{row['active_params'] / 1e6:.2f}M | {row['total_params'] / 1e6:.2f}M | {row['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def train_all(entries: list[Entry], common: list[str], seed_list: list[int], out_dir: Path, nproc: int,
              eval_batches: Optional[int], say: Callable[[str], None], what: str = "") -> dict[str, list[SeedResult]]:
    """Train (or reuse) every (config, seed) under `out_dir`, seed-major: after the first pass every
    config has a figure. Each entry trains to its own `train.steps`."""
    for entry in entries:  # before anything trains: a stale run.dir is refused up front
        for seed in seed_list:
            check_run_dir_holds(run_dir(out_dir, entry, seed), _seeded(entry.cfg, seed, run_dir(out_dir, entry, seed)))
    results: dict[str, list[SeedResult]] = {e.label: [] for e in entries}
    total, done = len(entries) * len(seed_list), 0
    for seed in seed_list:
        for entry in entries:
            done += 1
            directory, steps = run_dir(out_dir, entry, seed), entry.cfg.train.steps
            if finished(directory, steps):
                verb = "reused"
            else:
                restart_without_checkpoint(directory, say)
                train_one(entry, common, seed, directory, nproc)
                verb = "trained"
            result = seed_result(directory, seed, steps, eval_batches)
            results[entry.label].append(result)
            say(f"[{done}/{total}]{what} {entry.label} seed {seed}: val_loss {result.val_loss:.4f} ({verb}, "
                f"{result.wall_s:.0f} s) in {directory}")
    return results


def _seeded(cfg: Config, seed: int, directory: Path) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed),
                               run=dataclasses.replace(cfg.run, dir=str(directory)))
