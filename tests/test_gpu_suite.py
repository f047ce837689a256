import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_lists_every_step(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--dry-run", "--out", str(tmp_path / "gs")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for step in ("env", "install", "pytest-gpu", "bench-vq", "bench-attention", "bench-ops", "train-stack",
                 "train-eager", "summarize"):  # fmt: skip
        assert step in r.stdout
    assert "MISSING" not in r.stdout and "OVER BUDGET" not in r.stdout
    total = int(r.stdout.split("sum of step budgets: ")[1].split("s")[0])
    assert total <= 470  # a cold H200 run must fit a 540 s limit with time to spare


def test_gpu_suite_rejects_unknown_flags():
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "unknown argument" in r.stderr


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_step_on_cpu(tmp_path):
    """--smoke runs every step's real command line with tiny sizes on CPU: an argument one script does not accept
    (like bench_vq's old single-choice --dtype) fails here, not on the GPU lease."""
    out = tmp_path / "smoke"
    env = dict(os.environ, PYTHON=sys.executable, SVQ_FAST_TARGET=str(tmp_path / "site"))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=1500, env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"results.tgz", "summary.md", "summary.json", "rows.jsonl"} <= set(files), files
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["status"] for r in rows if r["bench"] == "suite"}
    assert all(s == "ok" for s in steps.values()), steps
    benches = {r["bench"] for r in rows}
    assert {"vq", "attention", "ops", "train"} <= benches, benches
    assert {(r["recipe"], r["variant"]) for r in rows if r["bench"] == "train"} >= {("stage1", "eager"),
                                                                                    ("stage2", "eager")}  # fmt: skip
    assert r.stdout.strip().splitlines()[-1]  # the ratio table is the last output
    assert "ratio" in r.stdout.split("=== total")[-1]
