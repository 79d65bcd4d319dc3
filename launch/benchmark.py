"""CPU throughput of dense vs MoE layouts, side by side, from one invocation.

Runs several short trainings of one config (default configs/tiny.yaml), one after another,
and prints a markdown table: training tokens/s (global), its ratio to the first row (a dense
model with the same active FFN FLOPs per token as top-2 of the experts), the final loss and
the mean fraction of routes dropped by capacity.

    .venv/bin/python launch/benchmark.py [--steps 40] [--config configs/tiny.yaml] [--out docs/benchmark_cpu.md]

tokens/s is the median of the `tokens_per_s` values of the log lines after step 10
(run.log_every=5; each value covers the steps since the previous line, eval excluded).
Every layout gets the same 2 cores: OMP_NUM_THREADS=2 for 1-process runs and 1 for
2-process runs (set in each run's environment). Runs use gloo on CPU via torch.distributed.run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from trainer.tracking import read_metrics

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 10  # log lines at or before this step are left out of the median
OMP_THREADS = {1: 2, 2: 1}  # processes -> OMP_NUM_THREADS: 2 cores in total either way
COMMON = ["train.eval_every=0", "train.eval_batches=1", "run.progress=false", "train.warmup_steps=5",
          "run.log_every=5", "run.tracker=none", "train.device=cpu", "parallel.backend=gloo"]
DENSE = ["moe.num_experts=0", "parallel.ep=1", "model.dense_d_ff=512"]  # 2 x 256: same active FFN FLOPs

ROWS = [  # (label, processes, overrides); the first row is the baseline
    ("dense, 1 proc", 1, DENSE),
    ("dense, 2 procs (dp)", 2, DENSE),
    ("MoE 8x top-2, 1 proc", 1, ["parallel.ep=1"]),
    ("MoE 8x top-2, 2 procs ep=1 (replicated experts)", 2, ["parallel.ep=1"]),
    ("MoE 8x top-2, 2 procs ep=2", 2, ["parallel.ep=2"]),
    ("MoE 8x top-2, 2 procs ep=2, capacity 1.0", 2, ["parallel.ep=2", "moe.capacity_factor=1.0"]),
]


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "trainer"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "trainer"]


def run_one(nproc: int, overrides: list[str], config: str, steps: int, run_dir: Path) -> list[dict]:
    """Train once; return the metrics.jsonl records, or exit with the run's stderr tail."""
    cmd = [*launcher(nproc), "train", config, f"train.steps={steps}", *COMMON, *overrides, f"run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(OMP_THREADS[nproc]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        sys.exit(f"benchmark: run failed (exit {proc.returncode}): {' '.join(cmd)}\n--- stderr tail ---\n{tail}")
    return read_metrics(run_dir)


def summarize(records: list[dict]) -> dict:
    rates = [r["tokens_per_s"] for r in records if r["step"] > WARMUP_STEPS]
    if not rates:
        sys.exit(f"benchmark: no log lines after step {WARMUP_STEPS}; use --steps > {WARMUP_STEPS + 5}")
    return {"tokens_per_s": statistics.median(rates), "loss": records[-1]["loss"],
            "dropped": statistics.mean(r["dropped_frac"] for r in records), "samples": len(rates)}


def report(results: list[tuple[str, int, list[str], dict]], config: str, steps: int, wall_s: float) -> str:
    base = results[0][3]["tokens_per_s"]
    lines = ["| run | tokens/s | vs baseline | final loss | mean dropped_frac |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for label, _, _, s in results:
        lines.append(f"| {label} | {s['tokens_per_s']:,.0f} | {s['tokens_per_s'] / base:.2f}x | "
                     f"{s['loss']:.4f} | {s['dropped']:.4f} |")
    samples = results[0][3]["samples"]
    lines += ["", f"Commands (from the repo root; every run also gets `train.steps={steps} {' '.join(COMMON)} "
                  "run.dir=<fresh temp dir>`):", ""]
    for label, nproc, overrides, _ in results:
        launch = "python -m trainer" if nproc == 1 else f"python -m torch.distributed.run --standalone " \
                                                         f"--nproc-per-node {nproc} -m trainer"
        lines.append(f"- {label}: `OMP_NUM_THREADS={OMP_THREADS[nproc]} {launch} train {config} "
                     f"{' '.join(overrides)}`")
    lines += ["", f"tokens/s: global training tokens per second, median of {samples} log-line windows of 5 steps "
                  f"after step {WARMUP_STEPS} (eval excluded). torch {version('torch')}, {os.cpu_count()} CPU "
                  f"cores, gloo. Figures are from one run of each on a shared, noisy machine; ratios compare "
                  f"runs of this one invocation ({wall_s:.0f} s wall in total)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default configs/tiny.yaml)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = parser.parse_args()
    config_path = Path(args.config).resolve()
    try:
        config = str(config_path.relative_to(REPO))
    except ValueError:
        config = str(config_path)

    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        for i, (label, nproc, overrides) in enumerate(ROWS):
            print(f"[{i + 1}/{len(ROWS)}] {label} ...", file=sys.stderr, flush=True)
            records = run_one(nproc, overrides, config, args.steps, Path(tmp) / f"run{i}")
            results.append((label, nproc, overrides, summarize(records)))
    text = report(results, config, args.steps, time.perf_counter() - start)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
