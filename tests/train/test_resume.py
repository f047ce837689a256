"""kill -9 a 2-rank stage-1 run right after a checkpoint, resume with --run.resume=auto, and compare every
later loss with an uninterrupted run of the same configuration."""

import json
import subprocess
from pathlib import Path

import pytest

from svq_fast.dist import deepspeed_command

ROOT = Path(__file__).resolve().parents[2]
KILLER = Path(__file__).with_name("kill_after_step.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def launch(data, out, *extra, script=ROOT / "recipes/train_svqgan.py"):
    cmd = deepspeed_command(
        script,
        "--config",
        "svqgan_tiny",
        f"--data.synthetic_default={data}",
        "--data.synthetic_train_samples=200",
        "--model.ch=16",
        "--optim.max_steps=8",
        "--log.every=1",
        "--optim.micro_batch=4",
        "--loss.disc_start=2",
        "--loss.disc_warmup=1",
        "--run.save_every=4",
        "--log.progress=false",
        f"--run.out_dir={out}",
        *extra,
    )
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_kill9_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    full = launch(data, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    crashed = launch(
        data, tmp_path / "crash", "--kill-after-step=4", script=Path(__file__).with_name("kill_after_step.py")
    )
    assert crashed.returncode != 0  # it really died
    assert (tmp_path / "crash" / "checkpoints" / "step00000004" / "COMPLETE").exists()
    assert not (tmp_path / "crash" / "export").exists()

    resumed = launch(data, tmp_path / "crash", "--run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    a = json.loads((tmp_path / "full" / "history.json").read_text())
    b = json.loads((tmp_path / "crash" / "history.json").read_text())
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 9))
    for ha, hb in zip(a[4:], b[4:]):  # steps 5..8 ran after the resume
        for key in ("loss", "rec", "sem_ce", "d_loss"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), (ha["step"], key)
    assert (tmp_path / "crash" / "export" / "model.safetensors").exists()
