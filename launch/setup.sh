#!/usr/bin/env bash
# Create/refresh the virtual environment .venv in the repo root and install the trainer
# (editable) into it. torch is installed first, only if it is not importable yet: with nvidia-smi,
# torch>=2.4,<2.14 from the default index (a CUDA build); without it, the CPU build of torch 2.13.0,
# from pip's own index where that offers it (a local wheel) and from PyTorch's CPU wheel index otherwise.
#
# Usage: launch/setup.sh [--dev] [--wandb] [--hf] [--tensorboard] [--plot] [--accelerate] [--deepspeed]
#   (PYTHON=python3.11 to pick the interpreter)
#   --dev: everything the tests exercise (all of the below, pytest, transformers for the HF export check)
#   --wandb: Weights & Biases; --hf: Hugging Face datasets and tokenizers; --tensorboard: run.tracker=tensorboard;
#   --plot: matplotlib for `python -m trainer report`; --accelerate: launch/accelerate.sh;
#   --deepspeed: train.engine=deepspeed (built from source without build isolation, DS_BUILD_OPS=0, against
#   the torch installed here; on CPU machines its shared-memory comm op is compiled once, here)
# Idempotent: a second run skips the torch install and re-runs the (fast) editable install.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
deepspeed=0
for arg in "$@"; do
    case "$arg" in
        --dev) extras+=(dev); deepspeed=1 ;;
        --wandb) extras+=(wandb) ;;
        --hf) extras+=(hf) ;;
        --tensorboard) extras+=(tensorboard) ;;
        --plot) extras+=(plot) ;;
        --accelerate) extras+=(accelerate) ;;
        --deepspeed) extras+=(deepspeed); deepspeed=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "setup: unknown option '$arg' (expected --dev, --wandb, --hf, --tensorboard, --plot, --accelerate," \
                "--deepspeed)" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
py=.venv/bin/python

# the torch build pip would pick for a pin: "2.13.0+cpu" where the index offers the CPU build
resolved_torch() {
    "$py" -m pip install --dry-run --quiet --report - "torch==$1" 2>/dev/null | "$py" -c "import json, sys
print(next(i['metadata']['version'] for i in json.load(sys.stdin)['install'] if i['metadata']['name'] == 'torch'))" \
        2>/dev/null || true
}

if ! "$py" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$py" -m pip install -q "torch>=2.4,<2.14"  # a CUDA build, from the default index
    elif [[ "$(resolved_torch 2.13.0)" == *+cpu ]]; then
        # pip's own index already holds the CPU build (as on our CI machines, a local wheel)
        "$py" -m pip install -q "torch==2.13.0"
    else
        # the default index's torch 2.13.0 is a CUDA build that pulls several GB of CUDA libraries:
        # on a machine without a GPU take the CPU build from PyTorch's own index instead
        echo "setup: no GPU here: installing the CPU build of torch 2.13.0 from PyTorch's wheel index" >&2
        "$py" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

if ((deepspeed)); then
    if ! "$py" -c "import deepspeed" >/dev/null 2>&1; then
        # from source against the torch above: build isolation would fetch another (CUDA) torch to build with
        "$py" -m pip install -q setuptools wheel
        DS_BUILD_OPS=0 "$py" -m pip install -q --no-build-isolation "deepspeed>=0.19,<0.20"
    fi
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        # DeepSpeed's CPU backend compiles this op at its first run (about a minute): do it here, into
        # .venv/torch_extensions where the trainer looks for it (trainer/engines/deepspeed_zero.py);
        # seconds when it is built already
        DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" "$py" -c "from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" >/dev/null 2>&1 \
            || echo "setup: DeepSpeed's CPU comm op did not compile here (a C++ compiler is needed); DeepSpeed" \
                    "tries again at its first run" >&2
    fi
fi

spec="."
if ((${#extras[@]})); then
    spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
"$py" -m pip install -q -e "$spec"

echo "setup: .venv ready (torch $("$py" -c 'import torch; print(torch.__version__)'))"
