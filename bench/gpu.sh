#!/usr/bin/env bash
# One prepared GPU benchmark: installs nothing from the network, checks CUDA, and in
# under 8 minutes prints one table (pre-training tokens/s and MFU of the ~1B preset at
# sequence 2048 with torch.compile; the LoRA step against transformers + PEFT when
# present; peak GPU memory). Usage: bench/gpu.sh [extra args for bench/gpu.py]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device visible to torch ($($PY -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 470 $PY bench/gpu.py "$@"
