#!/usr/bin/env bash
# One-shot GPU check (H100/H200 device machine): build from source, run the CUDA tests, run the benchmarks, print a
# short table. Budget: about 8 minutes on an H100 (build ~2 min). Results land in $OUT (or ./gpu_out).
#   run it as:  bash benchmarks/gpu_check.sh
# The device machine has torch 2.11 and no diffusers: we build against its torch and skip diffusion tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
log "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)')"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} SALUN_EXT_CUDA=1 \
  timeout 400 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
log "build: rc=$? in $(( $(date +%s) - start ))s"
$PY -m salun_ext env | tee -a "$OUT/summary.txt"

log "CUDA tests"
SALUN_EXT_REQUIRE_NATIVE=1 timeout 300 $PY -m pytest tests -m cuda -q -x -p no:cacheprovider \
  --continue-on-collection-errors 2>&1 | tail -15 | tee -a "$OUT/summary.txt"

log "saliency masks (fp32 lists)"
timeout 300 $PY benchmarks/mask_table.py --device cuda --lists resnet18_cifar,sd15_unet,synthetic:2e9:249 \
  --json "$OUT/mask_fp32.json" 2>/dev/null | tee -a "$OUT/summary.txt"
log "saliency masks (7B-class bf16 list, 6.7B elements)"
timeout 200 $PY benchmarks/mask_table.py --device cuda --lists llama7b --dtype bf16 --methods salun_ext,radix_bincount \
  --reps 3 --json "$OUT/mask_llama7b_bf16.json" 2>/dev/null | tee -a "$OUT/summary.txt"

log "masked optimizer steps"
timeout 300 $PY benchmarks/optim_table.py --device cuda --lists resnet18_cifar,sd15_unet \
  --json "$OUT/optim.json" 2>/dev/null | tee -a "$OUT/summary.txt"

log "classification: ResNet-18 epoch on CIFAR-10-shaped data, SalUn RTE, Retrain (benchmarks/epoch_time.py)"
timeout 240 $PY benchmarks/epoch_time.py --amp bf16 --channels-last --out "$OUT/epoch_time.json" 2>&1 | tail -20 \
  | tee -a "$OUT/summary.txt"
# diffusers is not installed there: put its wheel (and huggingface_hub's) in .whl/ and carry it
log "generation: SD-sized UNet mask + masked step (benchmarks/diffusion_gpu.py)"
timeout 240 $PY benchmarks/diffusion_gpu.py --json "$OUT/diffusion_gpu.json" 2>&1 | tail -20 | tee -a "$OUT/summary.txt"
log "done in $(( $(date +%s) - start ))s"
