#!/usr/bin/env bash
# Installs the wheels carried in .whl/ (no network on the GPU machine) into a --target folder, never into the
# image's environment: bash benchmarks/install_offline.sh /tmp/svq_fast_site. gpu_suite.sh puts that folder on
# PYTHONPATH for every step. A wheel whose distribution the image already has is skipped (no shadowing of the
# image's torch stack). This package itself is used from the checkout (PYTHONPATH), without its native CPU
# extension (the GPU path uses Triton). Make the wheels on a machine with network: bash benchmarks/fetch_gpu_wheels.sh
# Then every line of benchmarks/gpu_wheels.txt is checked from a fresh interpreter: exit 1 (and a line per problem)
# when a required module does not import (optional ones, and versions other than pinned, are reported).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET=${1:-/tmp/svq_fast_site}
mkdir -p "$TARGET"
if ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "no .whl/ folder: nothing to install (make it with benchmarks/fetch_gpu_wheels.sh)"
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
PYTHONPATH="$(pwd):$TARGET${PYTHONPATH:+:$PYTHONPATH}" $PY - benchmarks/gpu_wheels.txt <<'PY'
import importlib
import importlib.metadata as md
import sys

bad = []
for line in open(sys.argv[1]):
    if line.startswith("#") or len(line.split()) < 3:
        continue
    spec, module, kind = line.split()[:3]
    dist, version = spec.split("==")
    try:
        importlib.import_module(module)
        have = md.version(dist)
    except Exception as e:  # noqa: BLE001 - any failure to import is the finding
        msg = f"{module} ({spec}, {kind}) NOT importable: {type(e).__name__}: {str(e)[:160]}"
    else:  # another version than pinned: the image's own copy (never shadowed), reported, not an install failure
        print(f"{module} {have}" + ("" if have == version else f" (pinned {version}; this one is not from .whl/)"))
        continue
    print(msg)
    if kind == "required":
        bad.append(msg)
try:
    import svq_fast  # noqa: F401 - the checkout itself
    print("svq_fast from", svq_fast.__file__)
except Exception as e:  # noqa: BLE001
    bad.append(f"svq_fast NOT importable: {type(e).__name__}: {e}")
    print(bad[-1])
if bad:
    print(f"install FAILED: {len(bad)} required module(s) do not import (benchmarks/gpu_wheels.txt):")
    for b in bad:
        print("  " + b)
    sys.exit(1)
print("install ok: every required module of benchmarks/gpu_wheels.txt imports")
PY
