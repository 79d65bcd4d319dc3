"""`compare --horizons 400,800,1600`: the same comparison at several training lengths.

MoE gains grow with the tokens each expert sees, so a gap measured at one length says little
about another. Each horizon N is a whole comparison (`train.steps=N` for every config, the
learning-rate schedule decaying to N, the same seeds) in `OUT/steps<N>/`, so finished horizons
are reused and an interrupted one resumes. Writes `OUT/horizons.md` (every config's val loss and
paired difference at each N), `OUT/horizons.json` and `OUT/horizons.png` (the paired difference
against steps, mean and std over seeds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from .compare import compare
from .compare_runs import CompareError


def parse_horizons(text: str) -> list[int]:
    try:
        horizons = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CompareError(f"compare: --horizons takes steps separated by commas (400,800,1600), got {text!r}") from None
    if not horizons or min(horizons) < 1 or len(set(horizons)) != len(horizons):
        raise CompareError(f"compare: --horizons needs distinct step counts >= 1, got {text!r}")
    return sorted(horizons)


def horizons(items: list[str], steps: list[int], seeds: int, nproc: int, out: str,
             say: Callable[[str], None] = print, eval_batches: Optional[int] = None) -> list[Path]:
    out_dir = Path(out)
    per_horizon = {}
    for n in steps:
        say(f"horizon {n} steps: {out_dir / f'steps{n}'}")
        rows, _ = compare([*items, f"train.steps={n}"], seeds, nproc, str(out_dir / f"steps{n}"), say, eval_batches)
        per_horizon[n] = rows
    written = [out_dir / "horizons.md", out_dir / "horizons.json"]
    written[0].write_text(markdown_horizons(per_horizon, seeds))
    written[1].write_text(json.dumps({"horizons": steps, "seeds": seeds, "final_eval_batches": eval_batches,
                                      "rows": {str(n): rows for n, rows in per_horizon.items()}}, indent=1))
    plot = plot_horizons(per_horizon, out_dir / "horizons.png", say)
    return written + ([plot] if plot else [])


def markdown_horizons(per_horizon: dict[int, list[dict]], seeds: int) -> str:
    steps = sorted(per_horizon)
    first = per_horizon[steps[0]][0]["config"]
    spread = seeds > 1
    head = " | ".join(f"{n} steps" for n in steps)
    lines = [f"val loss ({'mean ± std, ' + str(seeds) + ' seeds' if spread else '1 seed'}) and paired difference vs "
             f"{first}, by training length", "", f"| config | {head} |", "|---|" + "---:|" * len(steps)]
    for i, row in enumerate(per_horizon[steps[0]]):
        cells = []
        for n in steps:
            r = per_horizon[n][i]
            rel = f"{r['rel_diff_pct']:+.2f}%" + (f" ± {r['rel_diff_pct_std']:.2f}" if spread else "")
            cells.append(f"{r['val_loss_mean']:.4f} ({rel})")
        lines.append(f"| {row['config']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot_horizons(per_horizon: dict[int, list[dict]], path: Path, say: Callable[[str], None]) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("note: no horizons.png (matplotlib is not installed: bash launch/setup.sh --plot)")
        return None
    steps = sorted(per_horizon)
    rows = per_horizon[steps[0]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, row in enumerate(rows[1:], 1):
        means = [per_horizon[n][i]["rel_diff_pct"] for n in steps]
        stds = [per_horizon[n][i]["rel_diff_pct_std"] or 0.0 for n in steps]
        ax.errorbar(steps, means, yerr=stds, marker="o", capsize=3, label=row["config"])
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.set_xlabel("training steps (schedule decays to the last)")
    ax.set_ylabel(f"val loss vs {rows[0]['config']} (%, paired by seed)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
