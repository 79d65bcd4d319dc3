#!/usr/bin/env bash
# Run the trainer on NPROC processes of this machine under `accelerate launch` (Hugging Face
# accelerate), for users whose jobs already go through accelerate: it sets up the same
# torch.distributed environment as torchrun, and the per-step losses equal torchrun's
# (tests/test_accelerate.py). On GPUs add --gpu; without it the run is on CPU (gloo), unless your
# overrides say otherwise (they come after the CPU defaults).
#
# Usage: [NPROC=2] launch/accelerate.sh [--gpu] CONFIG [key=value ...]
#   needs `bash launch/setup.sh --accelerate` (or --dev)
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above, as this script's usage
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
cd "$(dirname "$0")/.."

device=(parallel.backend=gloo train.device=cpu)
if [[ "${1:-}" == "--gpu" ]]; then
    device=()
    shift
fi
if (($# < 1)); then
    echo "usage: [NPROC=2] launch/accelerate.sh [--gpu] CONFIG [key=value ...]" >&2
    exit 2
fi
NPROC="${NPROC:-2}"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    threads=$(( $(nproc) / NPROC ))
    export OMP_NUM_THREADS=$(( threads > 1 ? threads : 1 ))
fi
if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
if ! "$python" -c "import accelerate" >/dev/null 2>&1; then
    echo "error: accelerate is not installed; run \`bash launch/setup.sh --accelerate\`" >&2
    exit 2
fi

# validate the config on this machine first: a typo is one line, not a launcher's failure report
"$python" -m trainer check "$1" "${device[@]}" "${@:2}" --nproc "$NPROC" >/dev/null

# --multi_gpu selects accelerate's multi-process launcher (torch.distributed), also on CPU
exec "$python" -m accelerate.commands.launch --multi_gpu --num_processes "$NPROC" --num_machines 1 \
    -m trainer train "$1" "${device[@]}" "${@:2}"
