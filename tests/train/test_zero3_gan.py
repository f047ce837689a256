"""Stage 1 under ZeRO-3 on 2 ranks with the GAN and held-out shards: the discriminator's held-out health check calls
the generator outside its engine, with an image codebook large enough to be partitioned. Issue 28 item 4 expected the
quantizer to see a partitioned codebook there; on ebd16b9 this run passes too (DeepSpeed's module hooks gather it),
so this stays as the regression test of that path."""

import json
import subprocess
from pathlib import Path

import pytest

from svq_fast.config import DataConfig
from svq_fast.data.run_shards import ensure_synthetic
from svq_fast.dist import deepspeed_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_zero3_gan_run_with_heldout_shards_reports_the_discriminators_health(tmp_path):
    data = DataConfig(image_size=64, synthetic_default=str(tmp_path / "data"))
    val = ensure_synthetic(data, "val", 16, 0)
    cmd = deepspeed_command(
        ROOT / "recipes/train_svqgan.py",
        "--config",
        "svqgan_tiny",
        f"--data.synthetic_default={tmp_path / 'data'}",
        "--data.synthetic_train_samples=64",
        f"--data.val_shards={val}",
        "--model.ch=16",
        "--zero.stage=3",
        "--quantizer.image_codebook_size=8192",  # 8192 x 32 > ZeRO-3's persistence threshold (1e5): partitioned
        "--loss.disc_start=2",
        "--loss.disc_warmup=1",
        "--optim.micro_batch=2",
        "--optim.max_steps=4",
        "--log.every=1",
        "--log.progress=false",
        "--log.tensorboard=false",
        f"--run.out_dir={tmp_path / 'run'}",
    )
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    gaps = [h["disc_heldout_gap"] for h in history if "disc_heldout_gap" in h]
    assert len(gaps) == 3 and all(abs(g) < 1e3 for g in gaps), history
