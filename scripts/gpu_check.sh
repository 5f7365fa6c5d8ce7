#!/usr/bin/env bash
# Everything that needs a GPU, checked and timed in one go (docs/PERFORMANCE.md says how to
# read the figures). Measured on an H200 box with 16 cores: part 1 about 6 minutes (2.5 of
# them tests), part 2 about 4. `figures` runs a subset of their steps (not yet timed alone).
#   part 1: correctness (GPU tests, GPU vs CPU twins, kernels vs references), the mask
#           benchmark, the pipeline's stages against decode-only, a hand-written DALI
#           pipeline and torchvision, and the pipeline's device memory in a fresh process;
#   part 2: the trainer fed by each stage vs synthetic input (ResNet-50 and ResNet-18),
#           two ranks sharing the GPU under torchrun (training and the bench), the
#           previous release for before/after figures when given, a thread sweep, and
#           the headline summary (gpu_summary.json).
#   part 3: one round of A/B and probes, most needed first, meant to run with
#           MSCN_GPU_BUDGET_S=555 in one 600 s call (what does not fit is skipped): the GPU
#           tests the round's changes touch, the host-sync probes of the feed
#           (probe_syncs.py), the mask benchmark, the pipeline (now blurring in the loader
#           on a GPU) against the round-4 default (masks-blur-dali) with a GPU-time
#           profile, the same pipelines on tiny images (the host's ceiling), the trainer
#           fed by the bare and the full pipeline, DALI's outputs
#           taken on the loader's own stream (masks-private), the round-4 default, the colour
#           in the loader, DALI's outputs held longer and a feeder thread (ResNet-18, with
#           host time per step), ResNet-50 with the defaults and masks-private, memory, the
#           GPU vs CPU twins, ResNet-50 compiled, then if time is left the isolated A/B,
#           ResNet-18 compiled and the thread-affinity sweep (round 4, H200: 538 s for that
#           round's shorter list with the budget at 555; this list is not yet timed and will
#           not fit: plan a follow-up call, MSCN_GPU_STEPS=<the SKIPPED steps>);
#   figures: only the headline figures of gpu_summary.json (no tests, no attribution rows,
#           no sweeps), for a quick re-measurement on another box; MSCN_GPU_BUDGET_S=290
#           keeps it under 5 minutes whatever the box (not yet timed alone).
# Usage: bash scripts/gpu_check.sh [all|1|2|3|figures]. The parts can run as two commands on the same
# machine: results collect in $MSCN_GPU_RESULTS; after every step the part's log and a
# tarball of all results so far go to $OUT (so a killed run still hands back its figures).
# Before/after: set MSCN_OLD_SITE (site-packages of the previous release) and MSCN_OLD_SCRIPTS
# (its scripts/ folder) to time it in the same run.
# Budget: MSCN_GPU_BUDGET_S=555 bounds the whole run (a lent GPU's call is cut at 600 s; 45 s are left
# for unpacking and installing in the same call).
# A step starts only if what is left (less MSCN_GPU_RESERVE_S, 30, kept for the summary,
# which always runs) is at least MSCN_GPU_STEP_SHARE % (50) of its own limit and at least
# MSCN_GPU_MIN_STEP_S (15); else it is skipped (a SKIPPED line in the digest) and the next,
# shorter ones may still fit. A started step gets at most what is left; one killed there
# is marked CUT, not FAILED. Steps are in order of what the decisions need. 0 = no budget.
# Follow-up call: MSCN_GPU_STEPS=ab-isolated,train18-compile runs only the named steps (and
# the summary, over every result in $MSCN_GPU_RESULTS), e.g. the ones a budget SKIPPED, on
# the same warm machine: the earlier results stay where they are.
set -uo pipefail
SELF=$(realpath "$0")  # before the cd: started from inside scripts/, "$0" is relative to there
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${MSCN_GPU_BUDGET_S:-0}
RESERVE=${MSCN_GPU_RESERVE_S:-30}
MIN_STEP=${MSCN_GPU_MIN_STEP_S:-15}
SHARE=${MSCN_GPU_STEP_SHARE:-50}
STEPS=${MSCN_GPU_STEPS:-}  # e.g. ab-isolated,train18-compile: only these steps (and the summary)
for v in "$BUDGET" "$RESERVE" "$MIN_STEP" "$SHARE"; do
  case $v in ''|*[!0-9]*) echo "gpu_check.sh: MSCN_GPU_BUDGET_S, _RESERVE_S, _MIN_STEP_S and _STEP_SHARE take" \
                              "whole numbers, got '$v'" >&2; exit 2 ;; esac
done
BUDGET=$((10#$BUDGET)) RESERVE=$((10#$RESERVE)) MIN_STEP=$((10#$MIN_STEP)) SHARE=$((10#$SHARE))  # 0540: decimal
if [ "$MIN_STEP" -lt 1 ]; then echo "gpu_check.sh: MSCN_GPU_MIN_STEP_S must be >= 1 (timeout 0 means no limit)" >&2; exit 2; fi
if [ -n "$STEPS" ]; then  # a name that is no step ran nothing and said nothing: a follow-up call wasted
  KNOWN=$(grep -oE '(^|[^a-z_])run [a-z0-9-]+ [0-9]+' "$SELF" | awk '{print $2}' | sort -u | tr '\n' ' ')
  for s in ${STEPS//,/ }; do
    case " $KNOWN " in *" $s "*) ;; *) echo "gpu_check.sh: MSCN_GPU_STEPS: no step '$s' (steps: $KNOWN)" >&2; exit 2 ;; esac
  done
fi
PART=${1:-all}
OUT=${OUT:-/tmp/mscn_gpu_out}
R=${MSCN_GPU_RESULTS:-/tmp/mscn_gpu_results}
DATA=${MSCN_BENCH_DATA:-/tmp/mscn_synth}
TINY=${MSCN_TINY_DATA:-/tmp/mscn_tiny}  # 48x36 JPEGs: the host-ceiling step's
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$R"
LOG="$R/gpu_check_part$PART${STEPS:+_followup}.log"  # a follow-up call keeps the first call's log
status=0

run() {  # run NAME SECONDS CMD...: log everything, bound the time, remember failures, keep going
  local name=$1 limit=$2 cut=0; shift 2
  if [ -n "$STEPS" ] && [[ ",$STEPS,summary,synth," != *",$name,"* ]]; then return; fi  # not asked for this time
  if [ "$BUDGET" -gt 0 ]; then  # what is left of the budget, less the summary's reserve
    local left=$(( BUDGET - RESERVE - ($(date +%s) - T0) ))
    local need=$(( limit * SHARE / 100 )); [ "$need" -lt "$MIN_STEP" ] && need=$MIN_STEP
    if [ "$left" -lt "$need" ]; then  # it would most likely be killed half-way and hand back nothing
      echo "SKIPPED $name: ${left} s of the ${BUDGET} s budget left, it needs ${need}" | tee -a "$LOG"; save; return
    fi
    if [ "$left" -lt "$limit" ]; then echo "(budget) $name limited to ${left} s, not ${limit}" | tee -a "$LOG"; limit=$left; cut=1; fi
  fi
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$(date +%s) rc=0
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ "$cut" = 1 ] && { [ "$rc" = 124 ] || [ "$rc" = 137 ]; }; then
      echo "CUT $name: stopped at the ${limit} s the budget left it" | tee -a "$LOG"
    else
      echo "!!! $name FAILED (exit $rc; 124 = ran past ${limit} s)" | tee -a "$LOG"; status=1
    fi
  fi
  echo "=== $name done in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  save
}

save() {  # everything so far to $OUT, also if a later step is killed: the log and one tarball
  cp "$LOG" "$OUT"/ 2>/dev/null
  tar -czf "$OUT/results_part$PART.tar.gz" -C "$R" . 2>/dev/null
}

part1() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
  $PY -P -c "import os, torch, nvidia.dali as d, triton; print('torch', torch.__version__, 'dali', d.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), 'cores', len(os.sched_getaffinity(0)))" 2>&1 | tee -a "$LOG"
  # ImageNet-like synthetic JPEGs (500x375, ~90 KB): quick on 16 cores
  [ -d "$DATA/train" ] || run synth 120 $PY -P -m mscn data synth "$DATA" --classes 10 --per-class 300 --size 500x375 --seed 0
  # GPU tests, the kernels against their references (compiled), the table kernel's statistics
  run tests 240 env PYTHONSAFEPATH=1 $PY -m pytest -q -s tests/test_pipeline_gpu.py tests/test_pipeline_executor.py tests/test_mask_kernel.py \
      tests/test_masks.py tests/test_pipeline_highpass.py tests/test_pipeline_blur.py tests/test_h2d.py tests/test_train_lars.py \
      tests/test_pipeline_colour.py tests/test_loader_hold.py tests/test_loader_handover.py
  run pipeline 120 $PY scripts/gpu_pipeline_check.py --data "$DATA/train" --json "$R/pipeline.json"
  run masks 120 $PY scripts/bench_masks.py --json "$R/masks.json"
  run bench 240 $PY scripts/bench_pipeline.py --data "$DATA/train" --stages decode,bare,colour,views,highpass,masks,masks-blur-dali,masks-hp-late,masks-hp-loader \
      --baseline dali-plain,torchvision \
      --baseline-workers 16 --json "$R/bench.json" --plot "$R/bench.png"
  # the pipeline alone in a fresh process: what it adds to the device's memory
  run memory 90 $PY scripts/bench_pipeline.py --data "$DATA/train" --stages masks --iters 10 --repeats 2 \
      --json "$R/memory.json"
  run memory-fp32 90 $PY scripts/bench_pipeline.py data.output_dtype=float32 --data "$DATA/train" --stages masks \
      --iters 10 --repeats 2 --json "$R/memory_fp32.json"
}

figures() {
  [ -d "$DATA/train" ] || run synth 120 $PY -P -m mscn data synth "$DATA" --classes 10 --per-class 300 --size 500x375 --seed 0
  run masks 120 $PY scripts/bench_masks.py --json "$R/masks.json"
  run bench 180 $PY scripts/bench_pipeline.py --data "$DATA/train" --stages decode,masks --baseline dali-plain,torchvision \
      --baseline-workers 16 --json "$R/bench.json"
  run memory 90 $PY scripts/bench_pipeline.py --data "$DATA/train" --stages masks --iters 10 --repeats 2 \
      --json "$R/memory.json"
  run train18 120 $PY scripts/bench_pipeline.py --data "$DATA/train" --train --arch resnet18 --feeds masks \
      --no-priority-row --json "$R/train_r18.json"
  run train50 150 $PY scripts/bench_pipeline.py --data "$DATA/train" --train --arch resnet50 --feeds masks \
      --no-priority-row --json "$R/train_r50.json"
  summary
}

summary() {  # the headline figures and the A/B verdicts: always, whatever the budget says
  BUDGET=0 run summary 30 $PY scripts/gpu_summary.py "$R"
  cp "$R/gpu_summary.json" "$OUT"/ 2>/dev/null
}

part3() {  # this round's A/B and probes, most needed first, within MSCN_GPU_BUDGET_S
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
  $PY -P -c "import os, torch, nvidia.dali as d, triton; print('torch', torch.__version__, 'dali', d.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), 'cores', len(os.sched_getaffinity(0)))" 2>&1 | tee -a "$LOG"
  [ -d "$DATA/train" ] || run synth 60 $PY -P -m mscn data synth "$DATA" --classes 10 --per-class 300 --size 500x375 --seed 0
  # the GPU tests the round-5 changes touch: the twins (the GPU default now blurs in the
  # loader), the loader's blur, the pinned host-to-device copies, the colour kernel (round 4
  # ran all 65 others)
  run tests 120 env PYTHONSAFEPATH=1 $PY -m pytest -q -s tests/test_pipeline_gpu.py tests/test_pipeline_blur.py tests/test_h2d.py \
      tests/test_loader_hold.py tests/test_pipeline_colour.py tests/test_loader_handover.py
  # where the feed makes the host wait for the trainer's stream (round 4: the GPU idled ~9 ms
  # of every fed ResNet-18 step, whatever the pipeline): one line per probe
  run probe 90 $PY scripts/probe_syncs.py --data "$DATA/train" --json "$R/probe_syncs.json"
  run masks 60 $PY scripts/bench_masks.py --json "$R/masks.json"
  # DALI's per-sample draws on this box's CPU threads: one by one against one draw per view
  # (the 2-core machine: 12.9-15.2 against 0.8-1.8 ms per batch of 256)
  run draws 60 $PY scripts/bench_draws.py --threads 8
  # the pipeline (masks: the new GPU default, blur and high-pass as GEMMs in the loader)
  # against the round-4 default (masks-blur-dali), the colour in the loader too (DALI then
  # only decodes and crops: round 1's colour stage cost 81 % -> 22-30 % of decode-only),
  # the bare graph (decode, crop, flip, normalize: what masks-colour-loader can approach
  # at best, unless DALI's per-sample draws cost the host too) and the plain DALI
  # pipeline, profiled
  run bench 150 $PY scripts/bench_pipeline.py --data "$DATA/train" \
      --stages decode,bare,masks,masks-blur-dali,masks-colour-loader --baseline dali-plain \
      --profile /tmp/mscn_profile --profile-rows masks-blur-dali,masks-colour-loader --json "$R/bench.json"
  # the same pipelines on tiny images (32 px views of 48x36 JPEGs): the pixels cost next to
  # nothing there, so each rate is the ceiling the host allows (DALI's per-sample setup and
  # draws, the launches, the loader's Python); gpu_summary's CEILING lines set the bench's
  # rows against it: near 100 % = host-bound (docs/PERFORMANCE.md, "Is the pipeline
  # host-bound?")
  run host-ceiling 90 bash -c "{ [ -d '$TINY/train' ] || $PY -P -m mscn data synth '$TINY' --classes 4 \
      --per-class 300 --size 48x36 --seed 0; } && $PY scripts/bench_pipeline.py --data '$TINY/train' --size 32 \
      --stages decode,bare,masks,masks-blur-dali,masks-colour-loader --baseline dali-plain --json '$R/host_ceiling.json'"
  # the trainer: the barest feed (the floor), the default, DALI's outputs taken on the
  # loader's own stream (the handover probe's suspect for the ~9 ms idle: the trainer's
  # stream waits for DALI's next batches), the round-4 default, the colour in the loader,
  # the outputs held longer and the batches taken by a thread; each row with its host time
  # per step beside the profile's idle
  run train18 190 $PY scripts/bench_pipeline.py --data "$DATA/train" --train --arch resnet18 \
      --feeds bare,masks,masks-private,masks-blur-dali,masks-colour-loader,masks-hold,masks-thread --no-priority-row \
      --profile /tmp/mscn_profile --profile-rows masks-private,masks-colour-loader,masks-thread --json "$R/train_r18.json"
  # ResNet-50: the new default against the round-4 one (never timed with the blur in the
  # loader), on the loader's own stream, and with the colour in the loader too
  run train50 170 $PY scripts/bench_pipeline.py --data "$DATA/train" --train --arch resnet50 \
      --feeds masks,masks-private,masks-blur-dali,masks-colour-loader --no-priority-row --json "$R/train_r50.json"
  # the new default's device memory, in a fresh process (target <= 3 GiB)
  run memory 60 $PY scripts/bench_pipeline.py --data "$DATA/train" --stages masks --iters 10 --repeats 2 \
      --json "$R/memory.json"
  run pipeline 90 $PY scripts/gpu_pipeline_check.py --data "$DATA/train" --json "$R/pipeline.json"
  # the recipes' step: ResNet-50 compiled (train.compile=true in them since round 4: +34 % fed)
  run train50-compile 150 $PY scripts/bench_pipeline.py train.compile=true --data "$DATA/train" --train \
      --arch resnet50 --feeds masks --no-priority-row --json "$R/train_r50_compile.json"
  # if time is left: the pipeline A/B with one process per pipeline, ResNet-18 compiled, and
  # DALI's threads pinned to cores (data.thread_affinity, never timed)
  run ab-isolated 180 $PY scripts/bench_pipeline.py --data "$DATA/train" \
      --stages masks,masks-private,masks-blur-dali,masks-colour-loader --isolate 2 --iters 10 --repeats 3 \
      --json "$R/ab_isolated.json"
  run train18-compile 150 $PY scripts/bench_pipeline.py train.compile=true --data "$DATA/train" --train \
      --arch resnet18 --feeds masks --no-priority-row --json "$R/train_r18_compile.json"
  run sweep-affinity 120 $PY scripts/bench_pipeline.py --data "$DATA/train" --stages masks \
      --sweep affinity=false,true --iters 10 --repeats 3 --json "$R/sweep_affinity.json"
  summary
}

part2() {
  run train18 150 $PY scripts/bench_pipeline.py --data "$DATA/train" --train --arch resnet18 \
      --feeds bare,colour,views,highpass,masks,masks-blur-dali,masks-hp-late,masks-hp-loader --json "$R/train_r18.json"
  # ResNet-50: the full pipeline against the barest one (ResNet-18 above has every stage)
  run train50 180 $PY scripts/bench_pipeline.py --data "$DATA/train" --train --arch resnet50 --feeds bare,masks \
      --json "$R/train_r50.json"
  # two ranks on one GPU: gloo (NCCL refuses two ranks per GPU), disjoint shards, both pipelines on the card
  run ddp2-train 150 bash -c "cd /tmp && torchrun --standalone --nproc_per_node=2 -m mscn.train.pretrain \
      --config demo data.root=$DATA/train data.synthetic=false train.max_steps=30 train.log_every=10 \
      train.out_dir=/tmp/mscn_ddp2 train.knn_every_epochs=0 data.val_root= --resume none"
  run ddp2-bench 120 torchrun --standalone --nproc_per_node=2 scripts/bench_pipeline.py --data "$DATA/train" \
      --stages masks --iters 10 --repeats 3 --json "$R/ddp2.json"
  if [ -n "${MSCN_OLD_SITE:-}" ] && [ -d "${MSCN_OLD_SCRIPTS:-/nonexistent}" ]; then  # the previous release, same run
    run before 200 env PYTHONPATH="$MSCN_OLD_SITE:${PYTHONPATH:-}" $PY "$MSCN_OLD_SCRIPTS/bench_pipeline.py" \
        --data "$DATA/train" --stages decode,masks --train --arch resnet18 --json "$R/before.json"
  fi
  run sweep 150 $PY scripts/bench_pipeline.py --data "$DATA/train" --stages masks --iters 10 --repeats 2 \
      --sweep threads=4,8,12 --json "$R/sweep.json"
  run sweep-blur 90 $PY scripts/bench_pipeline.py --data "$DATA/train" --stages masks --iters 10 --repeats 2 \
      --sweep blur_window=0,23 --json "$R/sweep_blur.json"
  summary
}

: >"$LOG"
case "$PART" in
  1) part1 ;;
  2) part2 ;;
  3) part3 ;;
  all) part1; part2 ;;
  figures) figures ;;
  *) echo "usage: $0 [all|1|2|3|figures]" >&2; exit 2 ;;
esac
echo "--- summary" | tee -a "$LOG"
grep -h -E "^(SUMMARY|DECIDE|PROFILE|SYNCPROBE|HOST|DRAWS|SKIPPED|CUT|\||check |!!!|===)" "$LOG" | tail -n 120
save
exit $status
