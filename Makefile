# Two entry points: `make demo` (the main job, tiny, on CPU) and `make test`. Both build .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch pair that installs from this machine's disk; GPU users may install the package over their own torch.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo
NPROC ?= 2
APP_PORT ?= 7860

.PHONY: venv demo test test-fast lint bench-cpu clean check-sm90 app browser

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH_PINS) ninja
	# ninja on PATH: torch's BuildExtension then compiles the native sources in parallel
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pip install -q --no-build-isolation -e ".[dev,app]"
	touch $(STAMP)

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) NPROC=$(NPROC) PATH=$(abspath $(BIN)):$$PATH bash recipes/demo.sh

# The synthesis page on the finished demo's exports (recipes/app.py; the app extra comes with the venv).
app: $(STAMP)
	@test -f $(DEMO_DIR)/stage2/export/model.safetensors || { echo "make app: $(DEMO_DIR)/stage2/export is missing: run make demo first"; exit 1; }
	$(BIN)/python recipes/app.py --gpt $(DEMO_DIR)/stage2/export --port $(APP_PORT)

# Debian's chromium + chromedriver for tests/app/test_app_browser.py. Measured on a fresh 2-vCPU VM: apt-get update
# 2 s + install 29 s (121 MB). Without root or apt-get (or with NO_BROWSER=1) the browser test skips and says why.
browser:
	@if [ -n "$(NO_BROWSER)" ] || { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		log=$${TMPDIR:-/tmp}/svq_fast_apt_browser.log; start=$$(date +%s); \
		echo "make: installing chromium + chromium-driver with apt-get (log: $$log)"; \
		if (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) >$$log 2>&1; \
		then echo "make: browser installed in $$(( $$(date +%s) - start )) s"; \
		else echo "make: apt-get could not install chromium (see $$log); the browser test will skip"; fi; \
	else echo "make: no chromium/chromedriver and no root apt-get: the browser test will skip"; fi

test: $(STAMP) browser
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
