#!/usr/bin/env bash
# Run the trainer on NPROC CPU processes of this machine (gloo), via torchrun --standalone.
# When: no GPU, or trying a config out on a laptop; the main job (configs/tiny.yaml) and CI run this way.
# parallel.backend=gloo and train.device=cpu come before your overrides, so yours win.
#
# Usage: [NPROC=2] launch/cpu.sh CONFIG [key=value ...]
#   e.g. launch/cpu.sh configs/tiny.yaml train.steps=100 run.dir=runs/x
# OMP_NUM_THREADS defaults to max(1, cores / NPROC).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above, as this script's usage
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
cd "$(dirname "$0")/.."

if (($# < 1)); then
    echo "usage: [NPROC=2] launch/cpu.sh CONFIG [key=value ...]" >&2
    exit 2
fi

NPROC="${NPROC:-2}"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    threads=$(( $(nproc) / NPROC ))
    export OMP_NUM_THREADS=$(( threads > 1 ? threads : 1 ))
fi

if [[ -x .venv/bin/torchrun ]]; then torchrun=.venv/bin/torchrun; else torchrun=torchrun; fi
if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi

# validate the config on this machine first: a typo is one line, not torchrun's failure report
"$python" -m trainer check "$1" parallel.backend=gloo train.device=cpu "${@:2}" --nproc "$NPROC" >/dev/null

exec "$torchrun" --standalone --nproc-per-node "$NPROC" \
    -m trainer train "$1" parallel.backend=gloo train.device=cpu "${@:2}"
