"""Device-to-host reads per training step, counted on CPU (svq_fast/train/host_reads.py) over two runs of different
length: a step that does not log may read at most what its collective decisions need (stage 1: the generator's and
the discriminator's skip-or-not, with the stop request riding along; stage 2: one). Runs the GPU path's settings
(fused AdamW, DeepSpeed's norm kept on the device) with the pure-torch VQ (`quantizer.backend=ref`): the native CPU
op's backward reads its two upstream-gradient scalars (free on a CPU, the only device it runs on), while the GPU's
Triton backward takes them as tensors, as the reference does. Before this budget existed a step read 41 (stage 1) /
7 (stage 2) values: every logged scalar, the quantizers' usage statistics and dead-code search, DeepSpeed's norm
checks, AdamW's step counts."""

import pytest

from svq_fast.named_configs import get_config
from svq_fast.train.host_reads import HostReadCounter
from svq_fast.train.stage1 import train_stage1
from svq_fast.train.stage2 import train_stage2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SHORT, LONG = 2, 6  # steps; neither run logs (log.every) nor looks for dead codes (quantizer.restart_every) between


def _common(cfg, data, out, steps):
    cfg.data.synthetic_default, cfg.data.synthetic_train_samples, cfg.data.num_workers = str(data), 48, 0
    cfg.optim.max_steps, cfg.optim.fused_adam = steps, "on"
    cfg.log.every, cfg.log.progress, cfg.log.tensorboard = 100, False, False
    cfg.run.out_dir, cfg.run.overwrite = str(out), True
    return cfg


def stage1_cfg(data, out, steps):
    cfg = _common(get_config("svqgan_tiny"), data, out, steps)
    cfg.model.ch = 16
    cfg.loss.disc_start, cfg.loss.disc_warmup = 0, 0  # the GAN from step 0: both engines step every micro-batch
    cfg.quantizer.restart_every = 10  # > LONG
    cfg.quantizer.backend = "ref"  # the sync-free path, as Triton's on a GPU (see the module docstring)
    return cfg


def reads_per_step(train, make_cfg, tmp):
    counts = []
    for steps in (SHORT, LONG):
        with HostReadCounter(traces=True) as counter:
            train(make_cfg(tmp / f"run{steps}", steps))
        counts.append(counter)
    extra = counts[1].sites - counts[0].sites
    return (counts[1].count - counts[0].count) / (LONG - SHORT), extra


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("host_reads")


def test_stage1_step_reads_at_most_its_two_collective_decisions(tmp):
    per_step, sites = reads_per_step(train_stage1, lambda out, n: stage1_cfg(tmp / "data", out, n), tmp / "s1")
    assert per_step <= 2, f"{per_step} host reads per stage-1 step; where (over {LONG - SHORT} steps): {dict(sites)}"


def test_stage2_step_reads_at_most_one(tmp):
    export = tmp / "s1" / f"run{LONG}" / "export"
    if not (export / "model.safetensors").exists():  # run alone: make the stage-1 export first
        train_stage1(stage1_cfg(tmp / "data", tmp / "s1" / f"run{LONG}", LONG))

    def make(out, steps):
        cfg = _common(get_config("gpt_tiny"), tmp / "data", out, steps)
        cfg.stage1 = str(export)
        return cfg

    per_step, sites = reads_per_step(train_stage2, make, tmp / "s2")
    assert per_step <= 1, f"{per_step} host reads per stage-2 step; where (over {LONG - SHORT} steps): {dict(sites)}"
