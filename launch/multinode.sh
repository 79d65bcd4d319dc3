#!/usr/bin/env bash
# Multi-node launch: run this once on every node; torchrun's c10d rendezvous at
# MASTER_ADDR:MASTER_PORT joins them into one job.
# When: several GPU nodes without a scheduler (or from inside one, as launch/slurm.sbatch does).
#
# Usage: NNODES=2 MASTER_ADDR=node0 [NPROC_PER_NODE=8] [MASTER_PORT=29500] [RDZV_ID=moe-trainer] \
#            [MAX_RESTARTS=0] launch/multinode.sh CONFIG [key=value ...]
# NPROC_PER_NODE defaults to the GPU count from nvidia-smi; without GPUs it must be given. See launch/slurm.sbatch.
# MAX_RESTARTS (torchrun --max-restarts, default 0): when a worker dies, every node's agent restarts its
# workers up to this many times and the run resumes from its latest checkpoint in run.dir.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above, as this script's usage
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
cd "$(dirname "$0")/.."

if (($# < 1)); then
    echo "usage: NNODES=N MASTER_ADDR=HOST launch/multinode.sh CONFIG [key=value ...]" >&2
    exit 2
fi
if [[ -z "${NNODES:-}" ]]; then
    echo "multinode: NNODES is required (number of nodes)" >&2
    exit 2
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "multinode: MASTER_ADDR is required (host of the rendezvous)" >&2
    exit 2
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && (( $(nvidia-smi -L 2>/dev/null | wc -l) > 0 )); then
        NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
    else
        echo "multinode: no GPU found on this node (no nvidia-smi, or it lists none), so the processes per node are" \
             "unknown; set NPROC_PER_NODE=N (on CPU nodes also pass parallel.backend=gloo train.device=cpu)" >&2
        exit 2
    fi
fi
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-moe-trainer}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

# Workers meet in a store of their own each rendezvous round (rank 0's worker hosts it on a fresh port),
# not in the agents' shared store: after a restart the agents' TORCHELASTIC_RESTART_COUNT can differ
# (the node with the failure counts it, the others restart for the membership change and do not), so
# keys named by it would not meet in the shared store and the restarted workers would time out.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

if [[ -x .venv/bin/torchrun ]]; then torchrun=.venv/bin/torchrun; else torchrun=torchrun; fi
if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi

# validate the config on this node first: a typo is one line, not torchrun's failure report
LOCAL_WORLD_SIZE="$NPROC_PER_NODE" "$python" -m trainer check "$@" --nproc $((NNODES * NPROC_PER_NODE)) >/dev/null

exec "$torchrun" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    -m trainer train "$@"
