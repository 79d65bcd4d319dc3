"""`python -m trainer compare CONFIG [CONFIG ...] --seeds N [key=value ...]`: train configs
side by side on the same data, steps and seeds, and tabulate their held-out loss.

Each CONFIG is a YAML file, optionally followed by overrides of its own after a colon
(`configs/quality/moe.yaml:moe.aux_loss_coef=0.001,moe.z_loss_coef=0`); the trailing
key=value overrides apply to every config. Every (config, seed) trains in its own run.dir,
`OUT/<label>/seed<S>`, as `torchrun --nproc-per-node NPROC -m trainer train` (or one process),
one after the other. A run that already finished there is reused and an interrupted one
resumes, so an interrupted comparison continues where it stopped; a run.dir that holds another
config is refused. Seed S (train.seed + 0 .. N-1) seeds the initialisation and the data order of
every config alike, so the configs are also compared seed by seed.

Writes `OUT/compare.md` (the table), `OUT/compare.json` (the same, plus each seed's figures)
and `OUT/val_loss.png` (val-loss curves, mean over seeds, min-max band).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

from .compare_runs import CompareError, load_entries, markdown, parse_items, summarise, train_all
from .equal_time import equal_time


def compare(items: list[str], seeds: int, nproc: int, out: str, say: Callable[[str], None] = print,
            eval_batches: Optional[int] = None, budget_s: Optional[float] = None) -> tuple[list[dict], list[Path]]:
    """`eval_batches`: None = each run's own val loss at its last step; N = its final checkpoint
    evaluated over N validation batches afterwards (0 = the whole split). `budget_s`: also train
    every config for as many steps as fit in that many seconds of training (equal_time.py)."""
    if seeds < 1 or nproc < 1 or (eval_batches is not None and eval_batches < 0):
        raise CompareError("compare: --seeds and --nproc must be >= 1, --eval-batches >= 0")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):
        raise CompareError(f"compare: --budget-seconds must be a number of seconds > 0, got {budget_s}")
    out_dir = Path(out)
    entries = load_entries(items, nproc)
    common = parse_items(items)[1]
    base_seed, steps = entries[0].cfg.train.seed, entries[0].cfg.train.steps
    seed_list = [base_seed + i for i in range(seeds)]
    from ..run.output_dir import OutputDirError, make_output_dir

    try:
        make_output_dir(out_dir, "compare --out")
    except OutputDirError as e:
        raise CompareError(str(e)) from None
    results = train_all(entries, common, seed_list, out_dir, nproc, eval_batches, say)
    rows = summarise(entries, results)
    table = markdown(rows, seeds, eval_batches)
    summary = {"steps": steps, "seeds": seed_list, "nproc": nproc, "common_overrides": common,
               "final_eval_batches": eval_batches, "rows": rows}
    if budget_s is not None:
        summary["equal_time"] = equal_time(entries, rows, common, seed_list, out_dir, nproc, eval_batches, budget_s,
                                           say)
        table += "\n" + summary["equal_time"]["markdown"]
    written = [out_dir / "compare.md", out_dir / "compare.json"]
    written[0].write_text(table)
    written[1].write_text(json.dumps(summary, indent=1))
    plot = plot_curves(rows, out_dir, say)
    return rows, written + ([plot] if plot else [])


def plot_curves(rows: list[dict], out: Path, say: Callable[[str], None]) -> Optional[Path]:
    from .report import ReportError, plot_val_comparison

    curves = []
    for row in rows:
        by_step: dict[int, list[float]] = {}
        for seed in row["seeds"]:
            for step, value in seed["val_curve"]:
                by_step.setdefault(step, []).append(value)
        steps = sorted(s for s, v in by_step.items() if len(v) == len(row["seeds"]))  # every seed measured it
        curves.append((row["config"], steps, [by_step[s] for s in steps]))
    try:
        return plot_val_comparison(curves, out / "val_loss.png")
    except ReportError as e:
        say(f"note: no plot ({e})")
        return None
