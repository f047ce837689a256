#!/usr/bin/env bash
# Installs the wheels carried in .whl/ (no network on the GPU machine) into a --target folder, never into the
# image's environment: bash benchmarks/install_offline.sh /tmp/svq_fast_site. gpu_suite.sh puts that folder on
# PYTHONPATH for every step. A wheel whose distribution the image already has is skipped (no shadowing of the
# image's torch stack). This package itself is used from the checkout (PYTHONPATH), without its native CPU
# extension (the GPU path uses Triton). Make the wheels on a machine with network: bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET=${1:-/tmp/svq_fast_site}
mkdir -p "$TARGET"
if ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "no .whl/ folder: nothing to install"
else
  # distribution name of each wheel (file name up to the first '-'), kept when not importable from the image
  mapfile -t need < <($PY - <<'PY'
import glob, importlib.metadata as md, os
for w in sorted(glob.glob(".whl/*.whl")):
    name = os.path.basename(w).split("-")[0]
    try:
        md.version(name.replace("_", "-"))
    except md.PackageNotFoundError:
        print(w)
PY
)
  if [ ${#need[@]} -gt 0 ]; then
    $PY -m pip install -q --no-index --no-deps --target "$TARGET" "${need[@]}"
    echo "installed into $TARGET: ${need[*]}"
  else
    echo "every carried wheel is already installed"
  fi
fi
PYTHONPATH="$(pwd):$TARGET${PYTHONPATH:+:$PYTHONPATH}" $PY - <<'PY'
import importlib
for mod in ("svq_fast", "deepspeed", "webdataset", "xformers", "vector_quantize_pytorch"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "ok"))
    except Exception as e:  # noqa: BLE001 - report only
        print(mod, "NOT importable:", type(e).__name__, str(e)[:120])
PY
