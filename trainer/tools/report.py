"""`python -m trainer report RUN_DIR [RUN_DIR ...] [--out DIR]`: PNG plots of runs from
their `metrics.jsonl` (and `config.yaml`, for tokens per step).

Writes into the first run dir (or `--out`):
  * `loss.png`: train loss (lines) and val loss (markers) against steps and against tokens,
    every run overlaid (e.g. dense vs MoE);
  * `routing.png`: dropped fraction and expert load CV (worst layer) against steps, MoE runs;
  * `expert_load_<run>.png`: per MoE layer, each expert's share of the routes over training
    as a heatmap (needs `run.log_expert_counts=true` in the run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import yaml

from ..run.output_dir import OutputDirError, make_output_dir
from ..run.tracking import METRICS_FILE, MetricsError, read_metrics


class ReportError(ValueError):
    """A run dir without metrics, or no plotting library; one line."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("report: matplotlib is not installed; run `bash launch/setup.sh --plot` "
                          "(or pip install -e '.[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Run:
    def __init__(self, run_dir: Path):
        self.dir, self.name = run_dir, run_dir.resolve().name
        if not (run_dir / METRICS_FILE).is_file():
            raise ReportError(f"report: {run_dir} has no {METRICS_FILE} (not a run.dir, or the run logged nothing)")
        try:
            self.records = read_metrics(run_dir)
        except (MetricsError, OSError) as e:
            raise ReportError(f"report: {e}" if isinstance(e, MetricsError) else
                              f"report: {run_dir / METRICS_FILE} cannot be read: {e.strerror or e}") from None
        if not self.records:
            raise ReportError(f"report: {run_dir / METRICS_FILE} is empty")
        self.tokens_per_step = self._tokens_per_step()

    def _tokens_per_step(self) -> Optional[int]:
        try:
            cfg = yaml.safe_load((self.dir / "config.yaml").read_text())
            return int(cfg["train"]["batch_size"]) * int(cfg["model"]["seq_len"])
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
            return None

    def series(self, field: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[field]) for r in self.records if r.get(field) is not None]
        return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])


def plot_loss(runs: list[Run], out: Path, plt) -> Path:
    with_tokens = all(run.tokens_per_step for run in runs)
    fig, axes = plt.subplots(1, 2 if with_tokens else 1, figsize=(13 if with_tokens else 7, 4.5), squeeze=False)
    for ax, scale, xlabel in zip(axes[0], ("step", "tokens"), ("step", "tokens")):
        for i, run in enumerate(runs):
            factor = 1 if scale == "step" else run.tokens_per_step
            steps, loss = run.series("loss")
            ax.plot([s * factor for s in steps], loss, color=f"C{i}", label=f"{run.name} train")
            steps, val = run.series("val_loss")
            if val:
                ax.plot([s * factor for s in steps], val, "o--", color=f"C{i}", label=f"{run.name} val")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title("loss against steps")
    if with_tokens:
        axes[0][1].set_title("loss against training tokens")
    return _save(fig, out / "loss.png", plt)


def plot_routing(runs: list[Run], out: Path, plt) -> Optional[Path]:
    moe = [(i, run) for i, run in enumerate(runs) if run.series("expert_load_cv")[0]]
    if not moe:
        return None
    fig, (ax_drop, ax_cv) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, run in moe:
        ax_drop.plot(*run.series("dropped_frac"), color=f"C{i}", label=run.name)
        ax_cv.plot(*run.series("expert_load_cv"), color=f"C{i}", label=f"{run.name} (worst layer)")
        steps, mean_cv = run.series("expert_load_cv_mean")
        if mean_cv:
            ax_cv.plot(steps, mean_cv, ":", color=f"C{i}", label=f"{run.name} (mean over layers)")
    for ax, title, ylabel in ((ax_drop, "routes dropped by capacity", "dropped fraction"),
                              (ax_cv, "expert load imbalance", "load CV (std / mean; 0 = balanced)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "routing.png", plt)


def plot_expert_load(run: Run, out: Path, plt) -> Optional[Path]:
    """Heatmap per MoE layer: rows are experts, columns logged steps, colour = share of routes."""
    rows = [(r["step"], r["expert_counts"]) for r in run.records if r.get("expert_counts")]
    if not rows:
        return None
    steps = [s for s, _ in rows]
    n_layers, n_experts = len(rows[0][1]), len(rows[0][1][0])
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, 1.2 + 1.6 * n_layers), squeeze=False, sharex=True)
    for layer in range(n_layers):
        share_ES = [[counts[layer][e] / max(1, sum(counts[layer])) * n_experts for _, counts in rows]
                    for e in range(n_experts)]
        ax = axes[layer][0]
        image = ax.imshow(share_ES, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(steps[0], steps[-1], n_experts - 0.5, -0.5))
        ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(image, ax=ax, label="load / mean")
    axes[0][0].set_title(f"{run.name}: each expert's load over training (1 = balanced)")
    axes[-1][0].set_xlabel("step")
    return _save(fig, out / f"expert_load_{run.name}.png", plt)


def plot_val_comparison(curves: list[tuple[str, list[int], list[list[float]]]], path: Path) -> Path:
    """`compare`'s overlay: per config (label, steps, each step's val losses over seeds, seeds in the
    same order for every config). Left: the mean as a line, the min-max over seeds as a band.
    Right: each config against the first, the mean over seeds of the same-seed relative difference."""
    plt = _pyplot()
    fig, (ax, rel_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    base_label, base_steps, base_values = curves[0]
    base = dict(zip(base_steps, base_values))
    for i, (label, steps, values) in enumerate(curves):
        seeds = len(values[0]) if values else 0
        ax.plot(steps, [sum(v) / len(v) for v in values], "o-", color=f"C{i}", markersize=3,
                label=f"{label} ({seeds} seed{'s' * (seeds != 1)})")
        if seeds > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=f"C{i}", alpha=0.2)
        paired = [(step, [100 * (x / b - 1) for x, b in zip(v, base[step])]) for step, v in zip(steps, values)
                  if step in base and len(base[step]) == len(v)]
        rel_ax.plot([s for s, _ in paired], [sum(r) / len(r) for _, r in paired], "o-", color=f"C{i}", markersize=3,
                    label=label)
    ax.set_title("held-out loss: mean over seeds, band = min-max")
    ax.set_ylabel("val loss (nats/token)")
    rel_ax.set_title(f"against {base_label}, seed by seed (mean)")
    rel_ax.set_ylabel(f"val loss vs {base_label} (%)")
    for a in (ax, rel_ax):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(run_dirs: list[str], out_dir: Optional[str] = None, say: Callable[[str], None] = print) -> list[Path]:
    """Write the PNGs and return their paths; a run without per-expert counts is named once."""
    runs = [Run(Path(d)) for d in run_dirs]
    plt = _pyplot()
    try:
        out = make_output_dir(out_dir or runs[0].dir, "report --out")
    except OutputDirError as e:
        raise ReportError(str(e)) from None
    written = [plot_loss(runs, out, plt)]
    written.append(plot_routing(runs, out, plt))
    for run in runs:
        heatmap = plot_expert_load(run, out, plt)
        if heatmap is None and run.series("expert_load_cv")[0]:
            say(f"note: {run.dir} logged no per-expert counts; train with run.log_expert_counts=true for "
                "the expert-load heatmap")
        written.append(heatmap)
    return [p for p in written if p is not None]
