#!/usr/bin/env bash
# One prepared GPU benchmark: installs nothing from the network, checks CUDA, and in
# under 8 minutes prints two tables (pre-training tokens/s and MFU of the ~1B preset at
# sequence 2048 with torch.compile; the LoRA and QLoRA steps, LoRA against transformers + PEFT when
# present; peak GPU memory; then bf16 generation, graftlm's engine eager and compiled
# against transformers' generate; GRPO's sampling eager and compiled beside the plan's
# prediction). Usage: bench/gpu.sh [extra args for bench/gpu.py]
# The Python used is $PY if set, else the first of .venv/bin/python and python3 whose
# torch sees a CUDA device (a CPU-only virtualenv next to a CUDA system install is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_CHECK="import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
chosen=""
for candidate in ${PY:-.venv/bin/python python3}; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$CUDA_CHECK" 2>/dev/null; then
        chosen=$candidate
        break
    fi
done
if [ -z "$chosen" ]; then
    echo "bench/gpu.sh: no CUDA device visible to torch (tried: ${PY:-.venv/bin/python python3})" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Nothing may reach for the network (the models are built from configs, not downloaded).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout 470 "$chosen" bench/gpu.py "$@"
