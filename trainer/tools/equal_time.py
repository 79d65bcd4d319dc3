"""`compare --budget-seconds S`: every config trained for the same wall-clock budget.

A user with a fixed budget compares configs at equal time, not equal steps: a slower MoE step
buys fewer steps. After the equal-step runs, each config's step time on this machine is known
(the median over its seeds of the training intervals' tokens/s, measured in this very
comparison, side by side with the others), so each config then trains again, for every seed,
for the number of steps that fit in S seconds of training: its learning-rate schedule decays to
that step, as a run planned for the budget would. Evaluation, start-up and checkpoints are not
counted (they cost every config alike); the table shows each run's measured training time
beside the budget so a machine that slowed down is visible.

The steps are fixed once per `OUT/budget_<S>s/` (in `budget_steps.json`): a rerun with more
seeds or after an interruption trains to the same steps and reuses what is there.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable, Optional

from ..config import load_config
from .compare_runs import CompareError, Entry, SeedResult, summarise, train_all

BUDGET_STEPS_FILE = "budget_steps.json"


def budget_dir(out_dir: Path, budget_s: float) -> Path:
    return out_dir / f"budget_{budget_s:g}s"


def tokens_per_step(entry: Entry) -> int:
    return entry.cfg.train.batch_size * entry.cfg.model.seq_len


def steps_in_budget(rows: list[dict], entries: list[Entry], budget_s: float) -> dict[str, int]:
    """Each config's steps in `budget_s` seconds at its median measured training throughput."""
    steps = {}
    for row, entry in zip(rows, entries):
        if not (row["tokens_per_s"] > 0):
            raise CompareError(f"compare --budget-seconds: {entry.label} logged no tokens/s; its step time is unknown")
        steps[entry.label] = math.floor(budget_s * row["tokens_per_s"] / tokens_per_step(entry))
        if steps[entry.label] <= entry.cfg.train.warmup_steps:
            raise CompareError(f"compare --budget-seconds {budget_s:g}: {entry.label} fits {steps[entry.label]} steps, "
                               f"not more than its train.warmup_steps={entry.cfg.train.warmup_steps}; give a larger "
                               "budget")
    return steps


def fixed_steps(directory: Path, measured: dict[str, int], say: Callable[[str], None]) -> dict[str, int]:
    """The budget's steps as first fixed in `directory`, or `measured`, written there now."""
    path = directory / BUDGET_STEPS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved:
        kept = {label: saved.get(label, n) for label, n in measured.items()}
        if kept != measured:
            say(f"note: {path} fixed the budget's steps earlier ({kept}); this comparison's timing would give "
                f"{measured}; the earlier ones are kept so the runs there are reused")
        measured = kept
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**saved, **measured}, indent=1))
    return measured


def equal_time(entries: list[Entry], rows: list[dict], common: list[str], seed_list: list[int], out_dir: Path,
               nproc: int, eval_batches: Optional[int], budget_s: float, say: Callable[[str], None]) -> dict:
    """Train every config for `budget_s` seconds' worth of steps; a table beside the equal-step one."""
    directory = budget_dir(out_dir, budget_s)
    steps = fixed_steps(directory, steps_in_budget(rows, entries, budget_s), say)
    budget_entries = []
    for entry in entries:
        overrides = [*entry.overrides, f"train.steps={steps[entry.label]}"]
        budget_entries.append(Entry(entry.path, overrides, entry.label, load_config(entry.path, [*common, *overrides])))
    say(f"equal time, {budget_s:g} s of training each: " + ", ".join(f"{label} {n} steps" for label, n in steps.items()))
    results = train_all(budget_entries, common, seed_list, directory, nproc, eval_batches, say, " equal time:")
    timed = summarise(budget_entries, results)
    for row, entry in zip(timed, budget_entries):
        row["steps"], row["tokens"] = steps[entry.label], steps[entry.label] * tokens_per_step(entry)
        row["train_s"] = [train_seconds(r, entry) for r in results[entry.label]]
    return {"budget_s": budget_s, "dir": str(directory), "rows": timed,
            "markdown": markdown_equal_time(timed, rows, budget_s, len(seed_list))}


def train_seconds(result: SeedResult, entry: Entry) -> float:
    """Training-step seconds of one budget run, from its median throughput (what the budget counts)."""
    return entry.cfg.train.steps * tokens_per_step(entry) / result.tokens_per_s


def markdown_equal_time(timed: list[dict], equal_steps: list[dict], budget_s: float, n_seeds: int) -> str:
    first, spread = timed[0]["config"], n_seeds > 1
    lines = [f"Equal time: {budget_s:g} s of training steps per run (steps from each config's measured tokens/s)",
             "",
             f"| config | steps | tokens | val loss at equal time | vs {first} | val loss at equal steps | "
             f"vs {first} | training time per run (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def loss(row):
        return f"{row['val_loss_mean']:.4f}" + (f" ± {row['val_loss_std']:.4f}" if spread else "")

    def rel(row):
        return f"{row['rel_diff_pct']:+.2f}%" + (f" ± {row['rel_diff_pct_std']:.2f}" if spread else "")

    for row, same_steps in zip(timed, equal_steps):
        tokens = f"{row['tokens'] / 1e6:.2f}M" if row["tokens"] >= 100_000 else f"{row['tokens']:,}"
        lines.append(f"| {row['config']} | {row['steps']:,} | {tokens} | {loss(row)} | {rel(row)} | "
                     f"{loss(same_steps)} | {rel(same_steps)} | {statistics.median(row['train_s']):.0f} s |")
    return "\n".join(lines) + "\n"
