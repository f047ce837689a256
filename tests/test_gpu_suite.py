import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_lists_every_step(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--dry-run", "--out", str(tmp_path / "gs")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for step in ("env", "install", "pytest-gpu", "bench-vq", "bench-attention", "bench-sampling", "train-throughput"):
        assert step in r.stdout
    assert "MISSING" not in r.stdout


def test_gpu_suite_rejects_unknown_flags():
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "unknown argument" in r.stderr
