"""One rank raises in the middle of a 2-rank stage-1 run under the real deepspeed launcher: every rank stops within
a bounded time, and the rank that did not fail prints the failed rank's error (before, it sat in its next collective
until the launcher killed it, and said nothing)."""

import subprocess
import time
from pathlib import Path

import pytest

from svq_fast.dist import deepspeed_command

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("raise_at_step.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
MESSAGE = "planted failure on one rank"  # what raise_at_step.py raises


@pytest.mark.parametrize("failing", [1, 0])
def test_one_rank_raising_stops_every_rank_with_its_error(tmp_path, failing):
    cmd = deepspeed_command(
        SCRIPT,
        "--raise-at-step=3",
        f"--raise-on-rank={failing}",
        "--config",
        "svqgan_tiny",
        f"--data.synthetic_default={tmp_path / 'data'}",
        "--data.synthetic_train_samples=64",
        "--model.ch=16",
        "--optim.micro_batch=2",
        "--optim.max_steps=50",
        "--log.progress=false",
        "--log.tensorboard=false",
        f"--run.out_dir={tmp_path / 'run'}",
    )
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    other = 1 - failing
    assert f"[rank {other}] stopping: rank {failing}: RuntimeError: {MESSAGE}" in out, out[-4000:]
    assert time.monotonic() - t0 < 300, "the job took too long to stop"
