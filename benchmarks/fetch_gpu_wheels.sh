#!/usr/bin/env bash
# Downloads into .whl/ the wheels the reference GPU environment lacks, exactly the versions pinned in
# benchmarks/gpu_wheels.txt (the one list; install_offline.sh installs and checks the same lines). Run it on a machine
# with network before a GPU lease: bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PINS=benchmarks/gpu_wheels.txt
mkdir -p .whl
pins() {  # pins required|optional -> distribution==version, one per line
  awk -v want="$1" '!/^#/ && NF >= 3 && $3 == want {print $1}' "$PINS"
}
mapfile -t required < <(pins required)
mapfile -t optional < <(pins optional)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
for spec in "${required[@]}"; do
  case "$spec" in
    deepspeed==*) $PY -m pip wheel -q --no-deps -w .whl "$spec" ;;  # an sdist: built here as py3-none-any
    *) $PY -m pip download -q --no-deps -d .whl "${PLATFORM[@]}" "$spec" ;;
  esac
done
for spec in "${optional[@]}"; do
  $PY -m pip download -q --no-deps -d .whl "${PLATFORM[@]}" "$spec" || echo "optional $spec not fetched"
done
ls -la .whl
