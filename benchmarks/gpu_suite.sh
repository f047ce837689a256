#!/usr/bin/env bash
# One command that checks and times everything GPU-side (DESIGN.md section 7), in under 8 minutes:
#   bash benchmarks/gpu_suite.sh --out DIR      # on a machine with one CUDA GPU
#   bash benchmarks/gpu_suite.sh --dry-run      # anywhere: list the steps and check their scripts exist
# Installs the wheels carried in .whl/ (if present) without network, runs `pytest -m gpu`, the kernel
# benchmarks and short paper-size training-throughput runs of both recipes, prints a summary table last,
# and writes every log and JSON result to --out (default benchmarks/results/gpu-<date>).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    *) echo "unknown argument $1 (use --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$OUT"

# name | time limit (s) | command
STEPS=(
  "env|30|$PY benchmarks/device_info.py --out $OUT/device.json"
  "install|120|bash benchmarks/install_offline.sh"
  "pytest-gpu|150|$PY -m pytest -q -m gpu tests -p no:cacheprovider --junitxml=$OUT/pytest-gpu.xml"
  "bench-vq|75|$PY benchmarks/bench_vq.py --device cuda --dtype bf16,fp32 --out $OUT/bench_vq.json"
  "bench-attention|75|$PY benchmarks/bench_attention.py --device cuda --dtype bf16 --out $OUT/bench_attention.json"
  "bench-sampling|40|$PY benchmarks/bench_sampling.py --device cuda --out $OUT/bench_sampling.json"
  "train-throughput|200|$PY benchmarks/bench_train.py --device cuda --paper --precision bf16 --seconds 20 --steps 1000 --warmup 2 --micro-batch 8 --samples 512 --variants fused,ref --out $OUT/bench_train.json"
)

if [ "$DRY" = 1 ]; then
  echo "gpu_suite dry run: results would go to $OUT"
  missing=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$s"
    script=$(echo "$cmd" | awk '{for (i=1;i<=NF;i++) if ($i ~ /\.(py|sh)$/) {print $i; exit}}')
    if [ -n "$script" ] && [ ! -f "$script" ]; then echo "MISSING $script (step $name)"; missing=1; fi
    printf '%-18s limit %4ss  %s\n' "$name" "$limit" "$cmd"
  done
  exit $missing
fi

declare -a SUMMARY
suite_start=$SECONDS
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$s"
  echo "=== $name (limit ${limit}s): $cmd"
  t0=$SECONDS
  timeout "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  dt=$((SECONDS - t0))
  status=ok; [ $rc -eq 124 ] && status=timeout; [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed($rc)"
  tail -n 25 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-18s %-12s %5ss' "$name" "$status" "$dt")")
done

echo
echo "=== summary (total $((SECONDS - suite_start))s, results in $OUT)"
$PY benchmarks/summarize_results.py "$OUT" || true
printf '%s\n' "${SUMMARY[@]}"
