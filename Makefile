# Two entry points: `make demo` (the main job, tiny, on CPU) and `make test`. Both build .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch pair that installs from this machine's disk; GPU users may install the package over their own torch.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo
NPROC ?= 2

.PHONY: venv demo test test-fast lint bench-cpu clean check-sm90

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH_PINS) ninja
	# ninja on PATH: torch's BuildExtension then compiles the native sources in parallel
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) NPROC=$(NPROC) PATH=$(abspath $(BIN)):$$PATH bash recipes/demo.sh

test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -m "not slow" tests

# Static Hopper check (no GPU): every Triton kernel x default config x dtype compiled for sm_90a with triton 3.6.0
# (fetched once into ~/.cache/svq_fast); fails on spills or > 227 KiB shared memory; writes
# benchmarks/results/sm90_static.md. About two CPU-minutes.
check-sm90: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/check_sm90.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf build *.egg-info svq_fast/_C*.so runs/demo
