#!/usr/bin/env bash
# Installs what the GPU machine lacks from wheels carried in .whl/ (no network there), then this package
# without its native CPU extension (the GPU path uses Triton). Make the wheels on a machine with network:
#   bash benchmarks/fetch_gpu_wheels.sh      # writes .whl/ for Python 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --find-links .whl .whl/*.whl
fi
SVQ_FAST_NO_EXT=1 $PY -m pip install -q --no-deps --no-build-isolation -e .
$PY -c "import deepspeed, webdataset, svq_fast; print('deepspeed', deepspeed.__version__, 'webdataset ok')"
