"""Tools layer: subcommands that study runs rather than make them.

| module | job |
| --- | --- |
| `bench.py` | `python -m trainer bench`: MoE layer and training-step throughput against references run alongside |
| `bench_steps.py` | `bench --config`: configs' training steps timed in alternating rounds, ratio to the first, MFU, memory |
| `measure.py` | what bench measures with: time over ranks, the matmul peak, bytes saved for backward |
| `bench_peer.py` | `bench --peer deepspeed`: DeepSpeed's MoE layer at equal FLOPs on the same tokens |
| `stage_timing.py` | per-stage timing of an MoE layer's forward and backward (router, dispatch, experts, combine) |
| `step_profile.py` | `bench --profile`: a training step's time by part, backward charged to its forward's part |
| `compare.py` | `python -m trainer compare`: configs trained on the same data and seeds, tabulated |
| `compare_runs.py` | what compare runs with: config entries, each seed's run as a subprocess, paired summaries |
| `equal_time.py` | `compare --budget-seconds`: every config trained for the steps that fit in the same time |
| `horizons.py` | `compare --horizons`: the comparison at several training lengths, the gap against steps |
| `corpus.py` | `python -m trainer corpus austen`: Jane Austen's novels from a Debian package, a file per chapter |
| `report.py` | `python -m trainer report`: PNG plots of runs' metrics |
| `plan.py` | `python -m trainer plan`: a layout's bytes per rank from fake process groups, nothing allocated |

Imports: anything below the CLI (the loop, interop, build, engines, run, parallel and below).
"""
