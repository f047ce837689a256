#!/usr/bin/env bash
# The main job, tiny, on CPU: shards -> stage 1 (2 ranks) -> stage 2 (2 ranks) -> samples -> evaluation ->
# report (a short version of the synthetic Tables 1-3 for this run's models, and the diagnostic table).
# The evaluation instrument is the committed segmenter (svq_fast/eval/assets/segmenter_synthetic64: its README says
# how it was trained); SEGMENTER=DIR uses another one.
# Called by `make demo` with .venv/bin first on PATH. Outputs go to $DEMO_DIR (default runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-runs/demo}
NPROC=${NPROC:-2}
STAGE1_STEPS=${STAGE1_STEPS:-480}
STAGE2_STEPS=${STAGE2_STEPS:-300}
SEGMENTER=${SEGMENTER:-svq_fast/eval/assets/segmenter_synthetic64}
EVAL_SAMPLES=${EVAL_SAMPLES:-128}
# z_s the GPT trains and samples on: "map" (from the map alone: samples of one map vary the way real images of it
# do; benchmarks/results/issue29_condition_cpu/) or "reference" (from (real image, map), the paper: samples copy the
# reference's appearance; CONDITION=reference TOP_K=20 is the demo before issue 29)
CONDITION=${CONDITION:-map}
# Sampling settings come from the GPT export (gpt_tiny's sample config: top-k 50, measured there); TOP_K=N overrides
# top-k for both the samples and the evaluation.
top_k=(${TOP_K:+--top-k "$TOP_K"})
DATA=${DEMO_DATA:-$DEMO_DIR/data}
mkdir -p "$DEMO_DIR"
timings="$DEMO_DIR/timings.json"
declare -A T

start=$SECONDS
python -m svq_fast.data.make_shards --dataset synthetic --split train --size 64 --num-samples 4000 --out "$DATA/64px/train"
python -m svq_fast.data.make_shards --dataset synthetic --split val --size 64 --num-samples 256 --out "$DATA/64px/val"
T[shards]=$((SECONDS - start))
shards=(--data.train_shards="$DATA/64px/train" --data.val_shards="$DATA/64px/val")

start=$SECONDS
deepspeed --num_gpus "$NPROC" recipes/train_svqgan.py --config svqgan_tiny \
  "${shards[@]}" --optim.max_steps="$STAGE1_STEPS" --run.out_dir="$DEMO_DIR/stage1" --log.image_every=100 \
  --run.overwrite=true
T[stage1]=$((SECONDS - start))

start=$SECONDS
deepspeed --num_gpus "$NPROC" recipes/train_transformer.py --config gpt_tiny \
  "${shards[@]}" --optim.max_steps="$STAGE2_STEPS" --run.out_dir="$DEMO_DIR/stage2" --run.overwrite=true \
  --stage1="$DEMO_DIR/stage1/export" --condition="$CONDITION"
T[stage2]=$((SECONDS - start))

start=$SECONDS
python recipes/sample.py --gpt "$DEMO_DIR/stage2/export" --out "$DEMO_DIR/samples" --num-maps 6 --samples-per-map 4 \
  --condition "$CONDITION" "${top_k[@]}"
T[sample]=$((SECONDS - start))

# the synthetic experiment's measurements for this run's models: a segmenter trained on real scenes scores how well
# generations follow their maps (recipes/experiments/synthetic_tables.py does this for the whole family)
start=$SECONDS
evaluate=(python recipes/evaluate.py --segmenter "$SEGMENTER" --max-samples "$EVAL_SAMPLES" --cpu --stats-cache none)
"${evaluate[@]}" --mode stage1 --stage1 "$DEMO_DIR/stage1/export" --out "$DEMO_DIR/eval/stage1" --name sVQGAN
"${evaluate[@]}" --mode stage2 --gpt "$DEMO_DIR/stage2/export" --out "$DEMO_DIR/eval/stage2" --name sVQGAN-T "${top_k[@]}"
T[evaluate]=$((SECONDS - start))

printf '{' > "$timings"; sep=""
for k in shards stage1 stage2 sample evaluate; do printf '%s"%s": %s' "$sep" "$k" "${T[$k]}" >> "$timings"; sep=", "; done
printf '}\n' >> "$timings"
python recipes/demo_report.py --run-dir "$DEMO_DIR" --timings "$timings" --shards "$DATA/64px/val"
echo "demo done: $DEMO_DIR/report.md, $DEMO_DIR/samples/grid_rerenders.png, TensorBoard: tensorboard --logdir $DEMO_DIR"
