#!/usr/bin/env bash
# One script that checks and times everything that needs a GPU (../shared/GPU.md):
#   1. DALI GPU pipeline vs its CPU twin, decode / views / high-pass throughput
#   2. the Triton mask kernel vs its torch reference, and its bandwidth
#   3. the full benchmark: stage breakdown, torchvision baseline, sweep, trainer mode
# Prints a short table last; the full log goes to $OUT/gpu_check.log when OUT is set.
# Keep it under ~5 minutes on an H100/H200 box with 16 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mscn_gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
DATA=${MSCN_BENCH_DATA:-/tmp/mscn_synth}
status=0

run() {  # run NAME CMD...: log everything, remember failures, keep going
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$(date +%s)
  if ! "$@" >>"$LOG" 2>&1; then echo "!!! $name FAILED" | tee -a "$LOG"; status=1; fi
  echo "=== $name done in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

: >"$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
$PY -c "import torch, nvidia.dali as d, triton; print('torch', torch.__version__, 'dali', d.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" >>"$LOG" 2>&1

# ImageNet-like synthetic JPEGs (500x375, tens of KB), 16 cores make this quick.
run synth $PY -m mscn data synth "$DATA" --classes 10 --per-class 300 --size 500x375 --seed 0

run pipeline $PY scripts/gpu_pipeline_check.py --data "$DATA/train" --batch 256 --json "$OUT/pipeline.json"
run masks   $PY scripts/bench_masks.py --json "$OUT/masks.json"
run tests   $PY -m pytest -q -m gpu tests
# the compiled kernel against the reference: dtypes, in/out of place, odd sizes, channels_last, Philox
run kernel  $PY -m pytest -q tests/test_mask_kernel.py
run bench   $PY scripts/bench_pipeline.py --data "$DATA/train" --batch 256 --threads 8 \
            --baseline torchvision --baseline-workers 16 --json "$OUT/bench.json" --plot "$OUT/bench.png"
run sweep   $PY scripts/bench_pipeline.py --data "$DATA/train" --sweep threads=4,8,12 hw_decoder_load=0.65,0.9 \
            --json "$OUT/sweep.json"
run train50 $PY scripts/bench_pipeline.py --data "$DATA/train" --batch 256 --train --arch resnet50 --json "$OUT/train_r50.json"
run train18 $PY scripts/bench_pipeline.py --data "$DATA/train" --batch 256 --train --arch resnet18 --json "$OUT/train_r18.json"

echo "--- summary" | tee -a "$LOG"
grep -h -E "^(SUMMARY|\|)" "$LOG" | tail -n 60
exit $status
