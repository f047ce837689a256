"""The GPU suite's test step: `pytest -m gpu` on the core subset named in benchmarks/gpu_core_tests.txt (sized to the
step's budget), the other `-m gpu` tests deselected and written to --jsonl as not run, before any test starts (so a
killed step still says what it did not run). A core id that no longer exists is an error naming it.

    python benchmarks/gpu_tests.py --jsonl OUT/rows.jsonl --junitxml OUT/pytest-gpu.xml [extra pytest args]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE_FILE = ROOT / "benchmarks" / "gpu_core_tests.txt"
# every file with `-m gpu` tests (tests/test_gpu_suite.py checks that this list holds them all)
GPU_TEST_PATHS = ["tests/kernels", "tests/nn/test_attention.py", "tests/eval/test_sampling.py"]


def core_ids(path: Path = CORE_FILE) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


class CoreOnly:
    """pytest plugin: keep the core ids, deselect (and record) the rest."""

    def __init__(self, core: list[str], jsonl: str | None):
        self.core, self.jsonl = core, jsonl
        self.not_run: list[str] = []

    def pytest_collection_modifyitems(self, session, config, items):
        ids = {it.nodeid for it in items}
        missing = [c for c in self.core if c not in ids]
        if missing:
            raise pytest.UsageError(f"{CORE_FILE.name} names GPU tests that were not collected: {missing}")
        keep = [it for it in items if it.nodeid in self.core]
        drop = [it for it in items if it.nodeid not in self.core]  # not core; of them, the `-m gpu` ones are "not run"
        self.not_run = [it.nodeid for it in drop if it.get_closest_marker("gpu") is not None]
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
        row = {
            "bench": "gpu_tests",
            "step": "pytest-gpu-plan",
            "core": [it.nodeid for it in keep],
            "not_run": self.not_run,
        }
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"gpu tests: {len(keep)} core run, {len(self.not_run)} not run (listed in {self.jsonl or 'no --jsonl'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsonl", default=None)
    args, extra = p.parse_known_args(argv)
    os.chdir(ROOT)  # node ids are relative to the repository root
    plugin = CoreOnly(core_ids(), args.jsonl)
    return int(pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_PATHS, *extra], plugins=[plugin]))


if __name__ == "__main__":
    sys.exit(main())
