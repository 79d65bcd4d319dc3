"""Plot loss and load-balancing loss against step for one or more runs.

    .venv/bin/python launch/plot_metrics.py RUN_DIR [RUN_DIR ...] --out PNG

Reads RUN_DIR/metrics.jsonl. Top panel: train `loss` per logged step (line) and `val_loss`
on eval steps (markers). Bottom panel: `aux_loss` (1.0 = perfectly balanced experts; dense
runs log 0). Each run is labelled with its directory name. Needs matplotlib
(`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.tracking import read_metrics  # noqa: E402


def load_run(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except FileNotFoundError:
        print(f"error: {run_dir} has no metrics.jsonl", file=sys.stderr)
        sys.exit(2)


def main() -> int:
    parser = argparse.ArgumentParser(description="Plot loss and aux_loss vs step from runs' metrics.jsonl.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args()
    runs = [(d.resolve().name, load_run(d)) for d in args.run_dirs]

    fig, (ax_loss, ax_aux) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[2, 1])
    for i, (name, records) in enumerate(runs):
        color = f"C{i}"
        steps = [r["step"] for r in records]
        ax_loss.plot(steps, [r["loss"] for r in records], color=color, label=f"{name} train")
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax_loss.plot(*zip(*val), "o--", color=color, markersize=6, label=f"{name} val")
            last_step, last_val = val[-1]
            ax_loss.annotate(f"{last_val:.3f}", (last_step, last_val), textcoords="offset points",
                             xytext=(-6, 8), ha="right", color=color)
        ax_aux.plot(steps, [r["aux_loss"] for r in records], color=color, label=name)

    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("loss vs step")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_aux.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax_aux.set_ylabel("aux_loss (1 = balanced)")
    ax_aux.set_xlabel("step")
    ax_aux.grid(alpha=0.3)
    if len(runs) > 1:
        ax_aux.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
