"""Run layer: a run's life around the loop, from the first check to the last checkpoint.

| module | job |
| --- | --- |
| `preflight.py` | a valid config against this machine (device, packages, memory, DeepSpeed's JSON), before any group |
| `rundir.py` | one live run per `run.dir` (the lock), and what a run.dir holds |
| `agreement.py` | every rank's config and data fingerprint compared before the first model collective |
| `checkpoint.py` | what a checkpoint holds: entries under global expert ids, saved and loaded with DCP |
| `checkpoint_files.py` | `checkpoints/` on disk: names, the manifest, atomic publishing, verification, discovery |
| `preemption.py` | SIGTERM/SIGINT become a request to stop after the step, with a checkpoint |
| `error_once.py` | an error the same on every rank printed once, by whichever rank gets there first |
| `output_dir.py` | a subcommand's output directory made sure of before any work |
| `tracking.py` | `metrics.jsonl`, the console log, wandb / tensorboard, the progress bar |

Imports: `parallel` and the layers below it (`config`, `seeding`, `model`, `moe`, `data`),
never an engine, the builder, the loop or a tool.
"""
