#!/usr/bin/env bash
# One-GPU check of the training and evaluation paths (issue #15): the reference 20M config (bf16) on a small
# injected build, 300 steps of 64 x 2048 tokens with ai2-olmo's Trainer, a SIGUSR2 preemption at step 150 and
# the resume (every step once), tokens/s and MFU, then `eval --device cuda` on every checkpoint.
# Sized for under 8 minutes of GPU time on an H100-class GPU; see benchmarks/gpu_check.py for each stage.
#
#   bash benchmarks/gpu_check.sh [WORKDIR]        # after `pip install -e '.[test]'` with a CUDA build of torch
#   COMPILE=1 bash benchmarks/gpu_check.sh        # the same with torch.compile
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-gpu-check}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF
timeout 480 python benchmarks/gpu_check.py --workdir "$workdir" ${COMPILE:+--compile} \
  --config olmo_configs/reference/20M.yaml --steps 300 --batch 64
