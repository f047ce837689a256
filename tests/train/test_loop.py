"""The shared training loop with a fake engine: guards, preemption, time limit, resume bookkeeping."""

import itertools
import json
import os
import signal

import pytest
import torch

from svq_fast.config import GPTConfig, Stage2Config
from svq_fast.train import loop
from svq_fast.train.checkpoint import COMPLETE
from svq_fast.train.perf import PhaseTimer


class FakeEngine:
    def __init__(self):
        self.module = torch.nn.Linear(2, 2)
        self.steps = 0

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, save_dir, tag, client_state):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "state.json"), "w") as f:
            json.dump({"client": client_state, "steps": self.steps}, f)

    def load_checkpoint(self, load_dir, tag):
        with open(os.path.join(load_dir, tag, "state.json")) as f:
            blob = json.load(f)
        self.steps = blob["steps"]
        return load_dir, blob["client"]


def make_cfg(tmp_path, **run):
    cfg = Stage2Config(model=GPTConfig(image_vocab=8, semantic_vocab=4, grid=1, n_layer=1, n_head=1, n_embd=2))
    cfg.optim.max_steps, cfg.log.every, cfg.log.progress, cfg.log.tensorboard = 6, 2, False, False
    cfg.run.out_dir = str(tmp_path)
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


class FakeStage(loop.Stage):
    """micro_step returns the next of `losses` ({} for a non-finite one, as a real stage does)."""

    name = "test"

    def __init__(self, engine, losses):
        super().__init__({"gpt": engine}, itertools.repeat({}), PhaseTimer(torch.device("cpu")))
        self.engine, self.losses = engine, iter(losses)

    def micro_step(self, batch, step):
        value = next(self.losses)
        if value != value or value in (float("inf"), float("-inf")):
            return {}
        self.engine.steps += 1
        return {"loss": value}


def make_stage(losses):
    engine = FakeEngine()
    return FakeStage(engine, losses), engine


def test_runs_to_max_steps_and_exports(tmp_path):
    stage, engine = make_stage([1.0] * 6)
    out = loop.run(make_cfg(tmp_path), stage, rank=0, world=1, dev=torch.device("cpu"), run_dir=str(tmp_path))
    assert out["step"] == 6 and out["stop_reason"] == "max_steps" and engine.steps == 6
    assert [h["step"] for h in out["history"]] == [2, 4, 6]
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "step00000006" / COMPLETE).exists()


def test_tensorboard_time_is_measured_and_zero_when_off(tmp_path):
    stage, _ = make_stage([1.0] * 6)
    off = loop.run(make_cfg(tmp_path / "off"), stage, rank=0, world=1, dev=torch.device("cpu"), run_dir=str(tmp_path))
    assert off["tensorboard_seconds"] == 0 and all(h["time/tensorboard_fraction"] == 0 for h in off["history"])
    cfg = make_cfg(tmp_path / "on")
    cfg.log.tensorboard = True
    stage, _ = make_stage([1.0] * 6)
    on = loop.run(cfg, stage, rank=0, world=1, dev=torch.device("cpu"), run_dir=str(tmp_path / "on"))
    fractions = [h["time/tensorboard_fraction"] for h in on["history"]]
    assert 0 < on["tensorboard_seconds"] < on["train_seconds"]
    assert fractions[0] == 0 and all(f > 0 for f in fractions[1:])  # a window reports the writes before it


def test_nonfinite_micro_batches_are_skipped_then_replaced(tmp_path):
    nan = float("nan")
    stage, engine = make_stage([1.0, nan, nan, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = loop.run(make_cfg(tmp_path), stage, rank=0, world=1, dev=torch.device("cpu"), run_dir=str(tmp_path))
    assert out["step"] == 6 and engine.steps == 6
    assert out["history"][0]["loss"] == 1.5  # steps 1-2 used losses 1 and 2; the NaNs were skipped


def test_too_many_consecutive_nonfinite_losses_stop_the_run(tmp_path):
    stage, _ = make_stage([1.0] + [float("inf")] * 10)
    with pytest.raises(loop.NonFiniteLossError, match="3 consecutive non-finite"):
        loop.run(
            make_cfg(tmp_path, max_nonfinite_skips=3),
            stage,
            rank=0,
            world=1,
            dev=torch.device("cpu"),
            run_dir=str(tmp_path),
        )


def test_sigterm_checkpoints_at_the_step_boundary(tmp_path):
    engine_steps = []
    stage, engine = make_stage([1.0] * 6)
    inner = stage.micro_step

    def micro_step(batch, step):
        logs = inner(batch, step)
        engine_steps.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return logs

    stage.micro_step = micro_step
    out = loop.run(make_cfg(tmp_path), stage, rank=0, world=1, dev=torch.device("cpu"), run_dir=str(tmp_path))
    assert out["stop_reason"] == "preempted" and out["step"] == 3
    assert (tmp_path / "checkpoints" / "step00000003" / COMPLETE).exists()
    assert not (tmp_path / "export").exists()  # an unfinished run is not exported
    assert signal.getsignal(signal.SIGTERM) is not None


def test_resume_continues_from_the_checkpoint(tmp_path):
    stage, _ = make_stage([1.0] * 3)
    cfg = make_cfg(tmp_path, max_seconds=1e-9)  # stops after the first step
    out = loop.run(cfg, stage, rank=0, world=1, dev=torch.device("cpu"), run_dir=str(tmp_path))
    assert out["stop_reason"] == "max_seconds" and out["step"] == 1
    stage2, engine2 = make_stage([1.0] * 5)
    cfg2 = make_cfg(tmp_path, resume="auto")
    out2 = loop.run(cfg2, stage2, rank=0, world=1, dev=torch.device("cpu"), run_dir=str(tmp_path))
    assert out2["step"] == 6 and engine2.steps == 1 + 5  # restored count + 5 new steps


def test_after_step_callbacks_run_after_each_step_and_its_checkpoint(tmp_path):
    seen = []

    def record(step):
        seen.append((step, (tmp_path / "checkpoints" / f"step{step:08d}" / COMPLETE).exists()))

    stage, _ = make_stage([1.0] * 6)
    cfg = make_cfg(tmp_path, save_every=2)
    out = loop.run(cfg, stage, rank=0, world=1, dev=torch.device("cpu"), run_dir=str(tmp_path), after_step=[record])
    # steps 1..5 (the last step ends the loop before the callbacks); the even ones were checkpointed first
    assert seen == [(1, False), (2, True), (3, False), (4, True), (5, False)]
    assert out["history"][0]["throughput/images_per_s_per_rank"] > 0  # the stage's throughput unit


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone():
    # the MFU denominator is measured at a run's first log window; a resumed process measures it again at another
    # step, so drawing its operands from the global RNG would make resumed runs diverge from uninterrupted ones
    from svq_fast.train import perf

    perf._cpu_peak_cache.clear()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    assert perf.measured_cpu_peak("fp32") > 0
    assert torch.equal(torch.rand(4), expected)
