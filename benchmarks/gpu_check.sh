#!/usr/bin/env bash
# One device call (H100/H200): build from source, the CUDA tests, the mask table, the optimizer table, the rest,
# in that priority order, inside one declared budget. Every result is appended to $OUT/results.jsonl as one JSON
# line the moment it exists (benchmark rows carry the torch baseline of the same run), so a run cut short still
# returns what it measured; a short table is printed at the end.
#
#   bash benchmarks/gpu_check.sh                  # on the device machine (torch 2.11 + cu130, Python 3.12)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh  # rehearsal: CUDA steps skipped, tiny CPU runs of the rest
#
# Nothing needs to be carried: the kernels are built from csrc/ with the machine's own torch (nvcc required);
# diffusers is optional (its step is skipped cleanly when it is missing). Wheels put in .whl/ (optional) are
# installed first. The dry mode is automatic when torch sees no GPU. Env: BUDGET_S (420), OUT (gpu_out), PY.
#
# Budget (seconds; a step gets at most its share and never more than what is left of BUDGET_S, so time a step
# does not use flows to the later ones):
#   build 150 | kernels_status 10 | cuda_tests 90 | mask_860m 25, mask_2b 20, mask_3b 25, mask_6.7b_bf16 25
#   | optim 60 | compact_state 30                      = 435 in priority order (the last ones get what is left)
#   | cuda_slow_tests (-m "cuda and slow": > 2^31 elements) up to 60, then llm_scale, epoch_time, diffusion up
#   to 120 each, from what is left (>= 15)
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-420}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
PY=${PY:-python3}
START=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
REPORT=("$PY" benchmarks/gpu_check_report.py)

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
DRY=${GPU_CHECK_DRY:-}
if [[ -z "$DRY" ]]; then
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then DRY=0; else DRY=1; fi
fi
"${REPORT[@]}" env "$RESULTS" dry="$DRY" budget_s="$BUDGET_S"
echo "== gpu_check: dry=$DRY budget=${BUDGET_S}s results=$RESULTS"

# run_step NAME ALLOTTED_S CMD...: at most ALLOTTED_S and never past the budget; SIGINT first (pytest still writes
# its summary, a benchmark keeps the rows it appended), SIGKILL 10 s later. One JSON line per step.
run_step() {
  local name=$1 allot=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  local t=$((allot < left ? allot : left))
  if ((t < 5)); then
    "${REPORT[@]}" emit "$RESULTS" step="$name" status=skipped reason="budget spent" allotted="$t"
    echo "== $name: skipped (budget spent)"
    return 0
  fi
  echo "== $name (at most ${t}s)"
  local t0=$(date +%s)
  timeout -s INT -k 10 "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? status=ok
  ((rc == 124 || rc == 130 || rc == 137)) && status=timed_out
  ((rc != 0 && rc != 124 && rc != 130 && rc != 137)) && status=failed
  "${REPORT[@]}" emit "$RESULTS" step="$name" status="$status" rc="$rc" seconds=$(($(date +%s) - t0)) allotted="$t"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
}
skip_step() {  # skip_step NAME REASON
  "${REPORT[@]}" emit "$RESULTS" step="$1" status=skipped reason="$2"
  echo "== $1: skipped ($2)"
}

# 1. build (the CUDA kernels for this card only)
if [[ "$DRY" == 1 ]]; then
  skip_step build "dry run (no GPU): using the kernels already built here"
else
  run_step build 150 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    SALUN_EXT_CUDA=1 "$PY" setup.py -q build_ext --inplace
fi
run_step kernels_status 10 "$PY" -m salun_ext env

# 2. the CUDA tests, all of them (no -x), failures listed in the JSON line
TESTS=${GPU_CHECK_TESTS:-tests}
if [[ "$DRY" == 1 ]]; then  # every -m cuda test skips without a GPU: this proves the plumbing only
  TESTS=${GPU_CHECK_TESTS:-tests/ops/test_optim_kernels.py}
fi
if "$PY" -c 'import pytest' 2>/dev/null; then
  # (-o addopts= drops the default "not slow" filter: slow tests are the separate step 4b)
  run_step cuda_tests 90 env SALUN_EXT_REQUIRE_NATIVE=1 "$PY" -m pytest "$TESTS" -m "cuda and not slow" -q -rfE \
    -o addopts= -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT/cuda_tests.xml"
  "${REPORT[@]}" pytest "$RESULTS" "$OUT/cuda_tests.xml" "$OUT/cuda_tests.log"
else
  skip_step cuda_tests "pytest is not installed"
fi

# 3. the mask table: 860M in ~700 tensors, 2B, 3B fp32 (crosses 2^31), 6.7B bf16
mask() {  # mask NAME ALLOTTED LIST DTYPE METHODS REPS
  run_step "$1" "$2" "$PY" benchmarks/mask_table.py --device "$DEVICE" --lists "$3" --dtype "$4" --methods "$5" \
    --reps "$6" --jsonl "$RESULTS"
}
if [[ "$DRY" == 1 ]]; then
  DEVICE=cpu
  mask mask_860m 25 unet686x16 fp32 salun_ext,cat_topk 1
else
  DEVICE=cuda
  mask mask_860m 25 sd15_unet fp32 salun_ext,salun_ext_histogram,salun_ext_window,cat_topk,radix_bincount,upstream_argsort 5
  mask mask_2b 20 synthetic:2e9:249 fp32 salun_ext,salun_ext_histogram,cat_topk,radix_bincount 3
  mask mask_3b 25 synthetic:3e9:300 fp32 salun_ext,salun_ext_histogram,cat_topk,radix_bincount 3
  mask mask_6.7b_bf16 25 llama7b bf16 salun_ext,salun_ext_histogram,cat_topk,radix_bincount 3
fi

# 4. the optimizer table: 860M (and its 686-tensor host overhead), densities 0.01 / 0.1 / 0.5 / 0.9
if [[ "$DRY" == 1 ]]; then
  run_step optim 30 "$PY" benchmarks/optim_table.py --device cpu --lists unet686x16 --densities 0.5 --reps 1 \
    --jsonl "$RESULTS"
else
  run_step optim 60 "$PY" benchmarks/optim_table.py --device cuda --lists unet686x16,sd15_unet \
    --densities 0.01,0.1,0.5,0.9 --reps 10 --jsonl "$RESULTS"
fi

# 4b. compact vs dense optimizer state (state bytes, step time; bit-identity checked), densities 0.01 / 0.1 / 0.5
if [[ "$DRY" == 1 ]]; then
  run_step compact_state 20 "$PY" benchmarks/compact_state.py --device cpu --lists unet686x16 --densities 0.1 \
    --reps 1 --jsonl "$RESULTS"
else
  run_step compact_state 30 "$PY" benchmarks/compact_state.py --device cuda --lists resnet18_cifar,sd15_unet \
    --densities 0.01,0.1,0.5 --reps 10 --jsonl "$RESULTS"
fi

# 4c. the slow CUDA tests (lists of > 2^31 elements, 10-20 GB each), with whatever budget is left
if [[ "$DRY" == 1 ]]; then
  skip_step cuda_slow_tests "dry run (no GPU)"
elif "$PY" -c 'import pytest' 2>/dev/null; then
  run_step cuda_slow_tests 60 env SALUN_EXT_REQUIRE_NATIVE=1 "$PY" -m pytest "$TESTS" -m "cuda and slow" -q -rfE \
    -o addopts= -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT/cuda_slow_tests.xml"
  "${REPORT[@]}" pytest "$RESULTS" "$OUT/cuda_slow_tests.xml" "$OUT/cuda_slow_tests.log" cuda_slow_tests_summary
else
  skip_step cuda_slow_tests "pytest is not installed"
fi

# 5. the rest, with whatever budget is left: the 7B-class Llama unlearning step (issue 15), epoch time, diffusion
if ! "$PY" -c 'import transformers' 2>/dev/null; then
  skip_step llm_scale "transformers is not installed"
elif [[ "$DRY" == 1 ]]; then
  run_step llm_scale 30 "$PY" benchmarks/llm_scale.py --tiny --device cpu --seq 32 --reps 1 --jsonl "$RESULTS"
else
  run_step llm_scale 120 "$PY" benchmarks/llm_scale.py --jsonl "$RESULTS"
fi
if [[ "$DRY" == 1 ]]; then
  skip_step epoch_time "dry run (no GPU)"
else
  run_step epoch_time 120 "$PY" benchmarks/epoch_time.py --amp bf16 --channels-last --out "$OUT/epoch_time.json"
fi
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
  skip_step diffusion "diffusers is not installed"
elif [[ "$DRY" == 1 ]]; then
  skip_step diffusion "dry run (no GPU)"
else
  run_step diffusion 120 "$PY" benchmarks/diffusion_gpu.py --json "$OUT/diffusion_gpu.json"
fi

"${REPORT[@]}" emit "$RESULTS" step=done seconds=$(($(date +%s) - START)) budget_s="$BUDGET_S"
"${REPORT[@]}" table "$RESULTS" | tee "$OUT/summary.md"
