#!/usr/bin/env bash
# Issue 32 re-probe: tiny 2-rank stage-1 runs on CPU (deepspeed launcher, gloo), then evaluate.py on their export.
# Run from the repository root: flock /tmp/svq_timing.lock bash benchmarks/reliability_probe.sh  (about 8 min
# on the shared 2-vCPU VM, load average 6-8). Results: benchmarks/results/reliability_cpu.md (issue 32 section).
set -u
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1
P=$PWD/runs/issue32/p; rm -rf "$P"; mkdir -p "$P"
PY=.venv/bin/python
DS() { deepspeed --num_gpus 2 --master_port $(($RANDOM + 20000)) recipes/train_svqgan.py --config svqgan_tiny \
  --data.synthetic_default="$P/data" --data.synthetic_train_samples=100 --model.ch=16 --optim.micro_batch=2 \
  --log.every=1 --log.progress=false --log.tensorboard=false --loss.disc_start=2 --loss.disc_warmup=1 "$@"; }
row() { echo "=== $1: exit $2 ($3 s)"; }
snap() { find "$1/checkpoints" -type f -printf '%p %i %T@ %s\n' | sort | sha256sum | cut -c1-16; }
run() {  # run NAME CMD...: log to $P/NAME.log, print the exit status and the lines that matter
  local name=$1; shift; local t0=$SECONDS
  "$@" >"$P/$name.log" 2>&1; local rc=$?
  row "$name" $rc $((SECONDS - t0))
  grep -E "error|warning|Warning|resumed|skips|stale|skipped|no sample|Traceback|refus" "$P/$name.log" \
    | grep -v -E "DeprecationWarning|UserWarning: .*(torchvision|pytree|deprecated)|warnings.warn|^\s*$" | cut -c1-400 | head -8
}

# A: the finished run every case starts from
run A DS --run.save_every=1 --optim.max_steps=8 --run.out_dir="$P/A"

# 1. run.json names another run than A's checkpoints
cp -a "$P/A" "$P/A1"; before=$(snap "$P/A1")
$PY -c "import json,sys; p=sys.argv[1]; b=json.load(open(p)); b['run_id']='20261207-000000-0ther1d0'; json.dump(b, open(p,'w'))" "$P/A1/run.json"
run item1_runjson_other_run DS --run.resume=auto --optim.max_steps=10 --run.save_every=1 --run.out_dir="$P/A1"
echo "checkpoints unchanged: $([ "$before" = "$(snap "$P/A1")" ] && echo yes || echo NO)"

# 2. a checkpoint written before the JSON state: A's step 8 with the old per-rank rng_rank*.pt and marker
cp -a "$P/A" "$P/A2"
$PY - "$P/A2/checkpoints/step00000008" <<'EOF'
import json, os, sys
import numpy as np, torch
tag = sys.argv[1]
for r in (0, 1):
    rng = json.load(open(f"{tag}/state_rank{r}.json"))["rng"]
    v, internal, gauss = rng["python"]; name, keys, pos, has_gauss, cached = rng["numpy"]
    torch.save({"python": (v, tuple(internal), gauss),  # what the old rng_state() returned, saved as it saved it
                "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
                "torch": torch.tensor(rng["torch"], dtype=torch.uint8), "cuda": None}, f"{tag}/rng_rank{r}.pt")
    os.remove(f"{tag}/state_rank{r}.json")
engines = json.load(open(f"{tag}/COMPLETE"))["engines"]
json.dump({"step": 8, "engines": engines}, open(f"{tag}/COMPLETE", "w"))  # the old marker: no hashes, no run id
EOF
run item2_old_rng_file DS --run.resume="$P/A2/checkpoints/step00000008" --optim.max_steps=9 --run.save_every=1 --run.out_dir="$P/A2b"

# 3. a stray empty .tar and random bytes named .tar beside the shards (+ item 6: a LOCK whose pid 1 was reused)
SH=$(ls -d "$P"/data/v*/*/train)
cp -a "$SH" "$P/train3"; : >"$P/train3/stray_empty.tar"; head -c 3000 /dev/urandom >"$P/train3/stray_random.tar"
mkdir -p "$P/C"; echo "{\"pid\": 1, \"host\": \"$(hostname)\", \"start\": \"1\"}" >"$P/C/LOCK"
run item3_stray_tars_and_reused_pid DS --data.train_shards="$P/train3" --optim.max_steps=2 --run.out_dir="$P/C"

# 6a. a truncated COMPLETE manifest in A's newest checkpoint; the resume also rewrites A's export (finished run)
cp -a "$P/A" "$P/A6"; m="$P/A6/checkpoints/step00000008/COMPLETE"; head -c 40 "$m" >"$m.x" && mv "$m.x" "$m"
run item6_truncated_manifest DS --run.resume=auto --optim.max_steps=8 --run.save_every=1 --run.out_dir="$P/A6"

# 4. hand-edited exports (config_sha256 deleted), evaluated on the synthetic val shards
EV() { $PY recipes/evaluate.py --mode stage1 --cpu --stats-cache none --max-samples 32 \
  --shards "$(ls -d "$P"/data/v*/*/val 2>/dev/null || echo "$P/val")" "$@"; }
$PY -c "
from svq_fast.config import DataConfig; from svq_fast.data.run_shards import ensure_synthetic
c = DataConfig(); c.synthetic_default = '$P/data'; c.image_size = 64; ensure_synthetic(c, 'val', 256, 0)" >/dev/null 2>&1
run item4_reference EV --stage1 "$P/A/export" --out "$P/e0"
for case in "ignore_index=3" "ch=\"16\"" "kind=\"evil\""; do
  d="$P/x_${case%%=*}"; cp -a "$P/A/export" "$d"
  $PY -c "import json,sys; p=sys.argv[1]; b=json.load(open(p)); b.pop('config_sha256'); k,v=sys.argv[2].split('=',1); b['config']['model'][k]=json.loads(v); json.dump(b, open(p,'w'))" "$d/config.json" "$case"
  run "item4_$case" EV --stage1 "$d" --out "$d.eval"
done
grep -h "mIoU (%)" -A2 "$P"/e0/metrics.md "$P"/x_ignore_index.eval/metrics.md 2>/dev/null | grep "^| " | grep -v model

# 5. evaluation that can score nothing / part of the samples
V=$(ls -d "$P"/data/v*/*/val); cp -a "$V" "$P/val_random"; cp -a "$V" "$P/val_cut"
for f in "$P"/val_random/*.tar; do head -c "$(stat -c %s "$f")" /dev/urandom >"$f"; done
run item5_random_bytes EV --stage1 "$P/A/export" --out "$P/e5a" --shards "$P/val_random"
$PY - "$P/val_cut" <<'EOF'
import glob, sys, tarfile
shard = sorted(glob.glob(sys.argv[1] + "/*.tar"))[0]
members = tarfile.open(shard).getmembers()
keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
last = [m for m in members if m.name.startswith(keys[7] + ".")][-1]  # cut inside sample 8
raw = open(shard, "rb").read(); open(shard, "wb").write(raw[: last.offset_data + 10])
EOF
run item5_cut_in_sample_8 EV --stage1 "$P/A/export" --out "$P/e5b" --shards "$P/val_cut" --max-samples 16
grep -E "samples_scored|\"samples\"" "$P/e5b/metrics.json"; sed -n 1,5p "$P/e5b/metrics.md"
