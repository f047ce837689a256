#!/usr/bin/env bash
# Downloads into .whl/ the wheels the reference GPU environment lacks (DESIGN.md section 7: Python 3.12,
# torch/triton/accelerate/safetensors/tensorboard present; deepspeed, webdataset, hjson, pydantic absent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
$PY -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp \
  webdataset braceexpand hjson pydantic pydantic-core annotated-types typing-inspection msgpack py-cpuinfo \
  einops ninja lpips
# optional benchmark rows (bench_vq vqp, bench_attention xformers), when they resolve for the image's torch:
$PY -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp vector-quantize-pytorch einx || echo "vector-quantize-pytorch not fetched (optional)"
ls -la .whl
