#!/usr/bin/env bash
# The one-shot GPU check, for a machine with one CUDA GPU (planned at about 5-8 minutes on one H100):
# the CUDA training path for real (TF32, then bf16 + torch.compile, a resume, FID during training),
# then tools/bench.py on the GPU, which fills the README's "-" GPU cells and the 100k-step projection.
#
#   bash tools/gpu_check.sh OUT_DIR
#
# Everything lands in OUT_DIR: gpu.txt, run logs, the run folders, perf-gpu.md. Offline by design:
# the built-in shapes data and random Inception weights (FID values are then not comparable, their
# cost is). A dry run of the script on a CPU, small and fast:
#   DEVICE=cpu STEPS=4 FID_IMAGES=16 EXTRA="--g-width 8 --d-width 8 --batch-size 16" BENCH="--quick" bash tools/gpu_check.sh /tmp/x
set -euo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR}
device=${DEVICE:-cuda}
steps=${STEPS:-300}
fid_images=${FID_IMAGES:-1000}
read -r -a extra <<< "${EXTRA:-}"
read -r -a bench <<< "${BENCH:-}"
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/gpu.txt"

train() {  # name, flags...
    local name=$1; shift
    python contragan.py --dataset shapes --device "$device" --fid-weights random --fid-images "$fid_images" \
        --log-every $((steps / 4 > 0 ? steps / 4 : 1)) --eval-every $((steps / 2 > 0 ? steps / 2 : 1)) "${extra[@]}" "$@" \
        --run-dir "$out/$name" 2>&1 | tee -a "$out/$name.log"
}
train run-fp32 --steps "$steps"                                  # TF32 on (the default on a GPU)
train run-fp32 --resume "$out/run-fp32" --steps $((steps + steps / 2))   # continue from last.pt
train run-bf16-compile --steps "$steps" --amp bf16 --compile
train run-proj --steps "$steps" --loss proj
python tools/bench.py --device "$device" --out "$out/perf-gpu.md" "${bench[@]}" 2>&1 | tee "$out/bench.log"
echo "gpu_check: done, $(date -u)" | tee -a "$out/gpu.txt"
