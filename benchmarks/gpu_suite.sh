#!/usr/bin/env bash
# One command that checks and times everything GPU-side (DESIGN.md section 7) within one 10-minute lease:
#   bash benchmarks/gpu_suite.sh --out DIR      # one CUDA GPU: <= 470 s in all (per-step budgets below)
#   bash benchmarks/gpu_suite.sh --dry-run      # anywhere: list the steps, their budgets, check the scripts exist
#   bash benchmarks/gpu_suite.sh --smoke --out DIR   # CPU, tiny sizes: every step's arguments really run (CI)
#   bash benchmarks/gpu_suite.sh --dry-run --smoke   # list the smoke's command lines
# --smoke takes the GPU run's control paths: the training stack is started by the DeepSpeed launcher
# (python -m deepspeed.launcher.runner, as svq_fast.dist.deepspeed_command does), each stage stops on run.max_seconds,
# stage 1's export of that run is stage 2's tokenizer; the test step runs the core subset (benchmarks/gpu_tests.py).
# Files written to --out (7 at most, so that all come back from an 8-file lease): suite.log (every step's output),
# rows.jsonl (one JSON row per measurement, appended as measured: a killed step keeps its rows), device.json,
# pytest-gpu.xml, and at the end results.tgz (all of it), summary.md, summary.json. The last thing printed is the
# ratio table of summarize_results.py (every ratio against its baseline from this run).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)"
DRY=0
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    *) echo "unknown argument $1 (use --out DIR, --dry-run, --smoke)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
BUDGET=${SVQ_SUITE_BUDGET_S:-470}  # whole suite, seconds: a 540 s command limit leaves room for a rerun
# Wheels the image lacks (deepspeed, webdataset, ...) go into this folder, first on PYTHONPATH for every step;
# exported here, in the script's own shell, so every step's `bash -c` inherits it.
TARGET=${SVQ_FAST_TARGET:-/tmp/svq_fast_site}
export PYTHONPATH="$ROOT:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export SVQ_FAST_NO_EXT=1 PYTHONUNBUFFERED=1
unset SVQ_FAST_AUTOTUNE  # pinned configs: no cold autotune storm (the autotune smoke tests set it themselves)
J="$OUT/rows.jsonl"

SCALE=1
if [ "$SMOKE" = 1 ]; then
  DEV=cpu
  SCALE=4  # a shared CPU is slow (DeepSpeed JIT-builds its shm op on first use): the budgets stretch, not the GPU's
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
  PYTEST_ARGS="--collect-only"
  VQ="--device cpu --dtype bf16,fp32 --shapes 64x128x16 --providers ref,gemm --modes forward+backward --reps 1"
  ATTN="--device cpu --dtype fp32 --shapes 1,2,64,32 --providers sdpa-math,ref --modes fwd+bwd --masks causal,prefix --reps 1"
  OPS="--smoke"
  TRAIN="--smoke --seconds 12"
  EAGER="--smoke"
  SAMPLE="--device cpu --batches 2 --modes static --layers 2 --width 64 --heads 2 --guidance 1.5"
else
  DEV=cuda
  PYTEST_ARGS=""
  VQ="--device cuda --dtype bf16,fp32 --providers triton,ref,gemm,vqp --modes forward,forward+backward --budget-s 0.3"
  VQ="$VQ --shapes 65536x16384x256,8192x16384x256,65536x1024x64"
  ATTN="--device cuda --dtype bf16 --providers triton,sdpa-flash,sdpa-efficient,sdpa-cudnn,xformers --modes fwd,fwd+bwd"
  OPS="--device cuda --dtype bf16"
  # each stage stops on --seconds (max_steps out of reach) and is timed from its first log step past the warm-up
  TRAIN="--device cuda --paper --precision bf16 --seconds 18 --steps 100000 --warmup 3 --micro-batch 8 --samples 256 --variants fused"
  EAGER="--device cuda --paper --precision bf16 --seconds 12 --steps 1000 --warmup 3 --micro-batch 8"
  # images/s of whole 256-token samples at batch 64 with CFG, the paper-size GPT: static cache with and without CUDA graphs
  SAMPLE="--device cuda --paper --batches 64 --modes static,cuda-graph --guidance 1.5"
fi

# The DeepSpeed launcher as a module of this interpreter: a `pip --target` install has no `deepspeed` script on PATH
# (the form svq_fast.dist.deepspeed_command builds; the port is drawn when the step starts).
LAUNCH="$PY -m deepspeed.launcher.runner --num_gpus 1 --master_port \$($PY -c 'from svq_fast.dist import free_port; print(free_port())')"

# name | budget (s, SIGINT at budget - 8, SIGKILL at budget) | command. Budgets sum to 465 s.
STEPS=(
  "env|10|$PY benchmarks/device_info.py --out $OUT/device.json"
  "install|25|bash benchmarks/install_offline.sh $TARGET"
  "pytest-gpu|75|$PY benchmarks/gpu_tests.py --jsonl $J $PYTEST_ARGS --junitxml=$OUT/pytest-gpu.xml"
  "bench-vq|55|$PY benchmarks/bench_vq.py $VQ --jsonl $J"
  "bench-attention|60|$PY benchmarks/bench_attention.py $ATTN --jsonl $J"
  "bench-ops|30|$PY benchmarks/bench_ops.py $OPS --jsonl $J"
  "train-stack|115|$LAUNCH benchmarks/bench_train.py $TRAIN --jsonl $J"
  "train-eager|50|$PY benchmarks/bench_train_eager.py $EAGER --jsonl $J"
  "sampling|35|$PY benchmarks/bench_sampling.py $SAMPLE --full-tokens 256 --window-grids '' --jsonl $J"
  "summarize|10|$PY benchmarks/summarize_results.py $OUT --write"
)

if [ "$DRY" = 1 ]; then
  echo "gpu_suite dry run: results would go to $OUT (suite budget ${BUDGET}s, PYTHONPATH $PYTHONPATH)"
  missing=0
  total=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$s"
    script=$(echo "$cmd" | awk '{for (i=1;i<=NF;i++) if ($i ~ /\.(py|sh)$/) {print $i; exit}}')
    if [ -n "$script" ] && [ ! -f "$script" ]; then echo "MISSING $script (step $name)"; missing=1; fi
    total=$((total + limit))
    printf '%-16s budget %4ss  %s\n' "$name" "$limit" "$cmd"
  done
  echo "sum of step budgets: ${total}s (suite budget ${BUDGET}s)"
  [ "$total" -le "$BUDGET" ] || { echo "OVER BUDGET"; missing=1; }
  exit $missing
fi

mkdir -p "$OUT"
LOG="$OUT/suite.log"
: > "$LOG"
suite_start=$SECONDS
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$s"
  limit=$((limit * SCALE))
  left=$((BUDGET * SCALE - (SECONDS - suite_start)))
  [ "$limit" -gt "$left" ] && limit=$left  # never run past the suite budget
  if [ "$limit" -lt 10 ]; then
    echo "{\"bench\": \"suite\", \"step\": \"$name\", \"status\": \"skipped (suite budget spent)\", \"seconds\": 0}" >> "$J"
    echo "--- $name skipped: suite budget spent"
    continue
  fi
  echo "=== $name (budget ${limit}s): $cmd" >> "$LOG"
  t0=$SECONDS
  # SIGINT first (pytest writes its junit file, Python benchmarks unwind), SIGKILL 8 s later.
  timeout -s INT -k 8 "$((limit - 8))" bash -c "$cmd" >> "$LOG" 2>&1
  rc=$?
  dt=$((SECONDS - t0))
  status=ok
  case $rc in 0) ;; 124|130|137) status=timeout ;; *) status="failed($rc)" ;; esac
  [ "$name" = pytest-gpu ] && [ $rc -eq 1 ] && status="tests failed"
  echo "{\"bench\": \"suite\", \"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $dt, \"budget\": $limit}" >> "$J"
  echo "--- $name: $status in ${dt}s (budget ${limit}s)"
  [ "$status" = ok ] || tail -n 6 "$LOG" | sed 's/^/    /'
done

tar -czf "$OUT/results.tgz" -C "$OUT" $(cd "$OUT" && ls | grep -v '^results.tgz$') 2>/dev/null
echo "=== total $((SECONDS - suite_start))s, results in $OUT ($(ls "$OUT" | wc -l) files)"
$PY benchmarks/summarize_results.py "$OUT" --table-only
