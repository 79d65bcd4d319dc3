#!/usr/bin/env bash
# Run the trainer with DeepSpeed's engine (ZeRO stage 0, 1 or 2) under DeepSpeed's own launcher,
# for users whose jobs start with `deepspeed`. It sets train.engine=deepspeed; pick the stage with
# train.zero_stage=0|1|2 and pass a DeepSpeed JSON with train.deepspeed_config=PATH. The same engine
# also runs under torchrun (launch/cpu.sh CONFIG train.engine=deepspeed ...). On GPUs add --gpu;
# without it the run is on CPU (gloo). For several nodes, set HOSTFILE (DeepSpeed's hostfile format).
#
# Usage: [NPROC=2] [HOSTFILE=hosts] launch/deepspeed.sh [--gpu] CONFIG [key=value ...]
#   needs `bash launch/setup.sh --deepspeed` (or --dev)
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
else
    export DS_ACCELERATOR=cpu  # DeepSpeed's launcher would otherwise warn that it found no GPU
fi
if (($# < 1)); then
    echo "usage: [NPROC=2] [HOSTFILE=hosts] launch/deepspeed.sh [--gpu] CONFIG [key=value ...]" >&2
    exit 2
fi
NPROC="${NPROC:-2}"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    threads=$(( $(nproc) / NPROC ))
    export OMP_NUM_THREADS=$(( threads > 1 ? threads : 1 ))
fi
if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
if ! "$python" -c "import deepspeed" >/dev/null 2>&1; then
    echo "error: deepspeed is not installed; run \`bash launch/setup.sh --deepspeed\`" >&2
    exit 2
fi

hosts=()
if [[ -n "${HOSTFILE:-}" ]]; then
    hosts=(--hostfile "$HOSTFILE")
else
    # validate the config on this machine first: a typo is one line, not a launcher's failure report
    # (with a hostfile the world size is the hostfile's; every rank validates at start-up anyway)
    "$python" -m trainer check "$1" "${device[@]}" "${@:2}" train.engine=deepspeed --nproc "$NPROC" >/dev/null
fi
# --no_local_rank: the trainer reads LOCAL_RANK from the environment, not a --local_rank argument
exec "$python" -m deepspeed.launcher.runner "${hosts[@]}" --num_gpus "$NPROC" --no_local_rank \
    --module trainer train "$1" "${device[@]}" "${@:2}" train.engine=deepspeed
