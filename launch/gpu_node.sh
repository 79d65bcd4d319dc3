#!/usr/bin/env bash
# Run the trainer on all GPUs of this node (NCCL), via torchrun --standalone.
# When: one machine with GPUs; experts are sharded over them with parallel.ep.
#
# Usage: [NPROC=<gpus>] launch/gpu_node.sh CONFIG [key=value ...]
#   e.g. launch/gpu_node.sh configs/gpu.yaml run.dir=runs/x
# NPROC defaults to the number of GPUs listed by nvidia-smi -L.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above, as this script's usage
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
cd "$(dirname "$0")/.."

if (($# < 1)); then
    echo "usage: [NPROC=<gpus>] launch/gpu_node.sh CONFIG [key=value ...]" >&2
    exit 2
fi

if [[ -z "${NPROC:-}" ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu_node: nvidia-smi not found; no NVIDIA GPU here (use launch/cpu.sh, or set NPROC)" >&2
        exit 2
    fi
    NPROC=$(nvidia-smi -L | wc -l)
fi

if [[ -x .venv/bin/torchrun ]]; then torchrun=.venv/bin/torchrun; else torchrun=torchrun; fi
if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi

# validate the config on this machine first: a typo is one line, not torchrun's failure report
"$python" -m trainer check "$@" train.device=cuda --nproc "$NPROC" >/dev/null

exec "$torchrun" --standalone --nproc-per-node "$NPROC" \
    -m trainer train "$@" train.device=cuda
