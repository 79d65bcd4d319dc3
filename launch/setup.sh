#!/usr/bin/env bash
# Create/refresh the virtual environment .venv in the repo root and install the trainer
# (editable) into it. torch is installed first, only if it is not importable yet:
# torch==2.13.0 on machines without nvidia-smi (the local CPU wheel), otherwise
# torch>=2.4,<2.14 from the default index (a CUDA build).
#
# Usage: launch/setup.sh [--dev] [--wandb] [--hf] [--plot] [--accelerate]     (PYTHON=python3.11 to pick the interpreter)
#   --dev: tests (pytest, matplotlib, accelerate); --wandb: Weights & Biases; --hf: Hugging Face datasets;
#   --plot: matplotlib for `python -m trainer report`; --accelerate: launch/accelerate.sh
# Idempotent: a second run skips the torch install and re-runs the (fast) editable install.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
for arg in "$@"; do
    case "$arg" in
        --dev) extras+=(dev) ;;
        --wandb) extras+=(wandb) ;;
        --hf) extras+=(hf) ;;
        --plot) extras+=(plot) ;;
        --accelerate) extras+=(accelerate) ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "setup: unknown option '$arg' (expected --dev, --wandb, --hf, --plot, --accelerate)" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
py=.venv/bin/python

if ! "$py" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$py" -m pip install -q "torch>=2.4,<2.14"
    else
        # pinned: pip's config on our CPU machines points at a local CPU wheel of this version;
        # an unpinned torch would pull several GB of CUDA packages
        "$py" -m pip install -q "torch==2.13.0"
    fi
fi

spec="."
if ((${#extras[@]})); then
    spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
"$py" -m pip install -q -e "$spec"

echo "setup: .venv ready (torch $("$py" -c 'import torch; print(torch.__version__)'))"
