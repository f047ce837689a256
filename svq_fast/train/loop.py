"""The training loop both stages share.

Read `run` top to bottom: resume -> for each step: `train_step` (data from `stage.loader`, forward, backward
and optimizer step inside `stage.micro_step`) -> logging window -> stop requests (SIGTERM, time limit) ->
checkpoint cadence -> test callbacks; then the final checkpoint and, for a finished run, the export.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from svq_fast import dist
from svq_fast.export import export_model
from svq_fast.train.checkpoint import full_state_dict, load_checkpoint, resolve_resume, save_checkpoint
from svq_fast.train.logger import RunLogger
from svq_fast.train.metrics import MetricsWindow
from svq_fast.train.perf import PhaseTimer, device_peak, profiler


class NonFiniteLossError(RuntimeError):
    pass


class Stage:
    """What the loop needs from a training stage; svq_fast.train.stage1.Stage1 and stage2.Stage2 implement it."""

    name = "train"
    progress_keys: tuple[str, ...] = ("loss",)  # window means shown in the progress bar (those present)
    throughput_unit: tuple[str, int] = ("images", 1)  # throughput/<unit>_per_s_per_rank and units per sample
    flops_per_sample: float = 0.0  # model FLOPs of one sample's forward + backward (see perf.count_flops)

    def __init__(self, engines: dict, loader, timer: PhaseTimer):
        self.engines = engines  # name -> DeepSpeed engine; the first one is exported at the end
        self.loader = loader  # iterable of this rank's micro-batches with state_dict() / load_state_dict()
        self.timer = timer  # phase times of the sampled steps

    def micro_step(self, batch: dict, step: int) -> dict[str, float]:
        """Forward, backward and engine.step() for one micro-batch -> named scalars; {} when a non-finite loss
        made every rank skip it."""
        raise NotImplementedError

    def lr(self) -> float:
        return 0.0

    def log_images(self, step: int, log: RunLogger) -> None:
        """Image grids for TensorBoard at logging steps (optional)."""


AfterStep = Callable[[int], None]  # called after each optimizer step is complete (and checkpointed, if due)


def run(
    cfg, stage: Stage, *, rank: int, world: int, dev: torch.device, run_dir: str, after_step: Sequence[AfterStep] = ()
) -> dict:
    opt = cfg.optim
    start = resume(cfg, stage, run_dir, rank)
    log = RunLogger(run_dir, rank=rank, total_steps=opt.max_steps, initial_step=start, tensorboard=cfg.log.tensorboard,
                    progress=cfg.log.progress, desc=stage.name)  # fmt: skip
    history = [h for h in _read_history(run_dir) if h["step"] <= start] if start else []
    peak = _announce_flops(stage, dev, cfg.zero.precision, rank)
    window = MetricsWindow(
        stage, micro_batch=opt.micro_batch, grad_accum=opt.grad_accum, world=world, dev=dev, peak=peak
    )
    guard = NonFiniteGuard(stage.name, cfg.run.max_nonfinite_skips, rank)
    batches = _forever(stage.loader)
    t_start = time.perf_counter()
    step, stop_reason = start, "max_steps"
    with _Preemption() as preempt, profiler(cfg.log.profile, run_dir) as prof:
        while step < opt.max_steps:
            with stage.timer.sampled((step + 1) % cfg.log.every == 0):  # one timed step per logging window
                step_logs = train_step(stage, batches, step, opt.grad_accum, guard, window)
            window.add(step_logs)
            step += 1
            if prof is not None:
                prof.step()
            log.advance(window.means(stage.progress_keys))
            over_time = cfg.run.max_seconds > 0 and time.perf_counter() - t_start > cfg.run.max_seconds
            stop = dist.any_rank(preempt.requested or over_time, dev)  # every rank stops at the same step
            last = step == opt.max_steps or stop
            if step % cfg.log.every == 0 or last:
                history.append(log_window(step, stage, window, log, guard))
            if last:
                if stop:
                    stop_reason = "preempted" if preempt.requested else "max_seconds"
                break
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                checkpoint(run_dir, step, stage, history, cfg.run.keep_last, rank)
            for callback in after_step:
                callback(step)
    log.close()
    checkpoint(run_dir, step, stage, history, cfg.run.keep_last, rank)
    if stop_reason == "max_steps":
        export(cfg, stage, rank, run_dir)
    elif rank == 0:
        print(
            f"[{stage.name}] stopped at step {step} ({stop_reason}); checkpoint saved, resume with --run.resume=auto",
            flush=True,
        )
    dist.barrier()
    return {
        "run_dir": run_dir,
        "history": history,
        "step": step,
        "stop_reason": stop_reason,
        "train_seconds": time.perf_counter() - t_start,
        "tensorboard_seconds": log.write_seconds,  # rank 0's time in TensorBoard writer calls (0 elsewhere)
    }


def resume(cfg, stage: Stage, run_dir: str, rank: int) -> int:
    """Restore engines, RNG and loader position from the checkpoint run.resume names -> the step to continue
    from; a fresh start seeds this rank's stream (dropout, CFG / image-modality dropout) and returns 0."""
    resume_dir = resolve_resume(run_dir, cfg.run.resume)
    if not resume_dir:
        torch.manual_seed(cfg.run.seed * 1000 + rank)
        return 0
    client = load_checkpoint(resume_dir, stage.engines)  # also restores this rank's RNG states
    if client.get("loader") is not None:
        stage.loader.load_state_dict(client["loader"])
    start = int(client.get("step", 0))
    if rank == 0:
        print(f"[{stage.name}] resumed from {resume_dir} at step {start}", flush=True)
    return start


class NonFiniteGuard:
    """Counts micro-batches skipped for a non-finite loss; too many in a row stop the run."""

    def __init__(self, name: str, max_in_row: int, rank: int):
        self.name, self.max_in_row, self.rank = name, max_in_row, rank
        self.in_row = self.total = 0

    def skipped(self, step: int) -> None:
        self.in_row += 1
        self.total += 1
        if self.rank == 0:
            print(
                f"[{self.name}] step {step}: non-finite loss, micro-batch skipped ({self.in_row} in a row)", flush=True
            )
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"{self.name}: {self.in_row} consecutive non-finite losses at step {step}; stopping. "
                "Lower optim.lr, check the data (a bad shard?), or resume from the last checkpoint."
            )

    def applied(self) -> None:
        self.in_row = 0


def train_step(
    stage: Stage, batches: Iterator[dict], step: int, grad_accum: int, guard: NonFiniteGuard, window: MetricsWindow
) -> dict[str, float]:
    """One optimizer step: grad_accum applied micro-batches (a skipped one is replaced by the next) -> their mean
    scalars. The data comes from `batches`; the gradient is taken and applied inside stage.micro_step."""
    step_logs: dict[str, float] = {}
    applied = 0
    while applied < grad_accum:
        t0 = time.perf_counter()
        batch = next(batches)
        window.data_seconds += time.perf_counter() - t0
        logs = stage.micro_step(batch, step)
        if not logs:  # a non-finite loss on some rank: every rank skipped this micro-batch
            guard.skipped(step)
            continue
        guard.applied()
        applied += 1
        for k, v in logs.items():
            step_logs[k] = step_logs.get(k, 0.0) + v / grad_accum
    return step_logs


def log_window(step: int, stage: Stage, window: MetricsWindow, log: RunLogger, guard: NonFiniteGuard) -> dict:
    """Reduce the window over ranks, write it to TensorBoard (with the stage's images), start the next window
    -> the history row of this step."""
    losses, scalars = window.reduce(log.write_seconds)
    scalars.update({"lr": stage.lr(), "guard/skipped_microbatches": float(guard.total)})
    log.scalars(step, {**{f"loss/{k}": v for k, v in losses.items()}, **scalars})
    if log.writer is not None:  # image grids: only for TensorBoard
        before, t0 = log.write_seconds, time.perf_counter()
        stage.log_images(step, log)
        log.write_seconds = before + time.perf_counter() - t0  # building the grid counts too
    window.reset()
    return {"step": step, **losses, **scalars}


def checkpoint(run_dir: str, step: int, stage: Stage, history: list[dict], keep_last: int, rank: int) -> None:
    """Collective: every engine's state + RNG + loader position; rank 0 writes the curve so far beside it, so a
    resumed run continues it."""
    state = getattr(stage.loader, "state_dict", None)
    client = {"step": step, "loader": state() if state is not None else None}
    save_checkpoint(run_dir, step, stage.engines, client, keep_last)
    if rank == 0:
        _write_history(run_dir, history)


def export(cfg, stage: Stage, rank: int, run_dir: str) -> None:
    """Collective under ZeRO-3 (the weights are gathered); rank 0 writes <run_dir>/export."""
    state = full_state_dict(next(iter(stage.engines.values())))
    if rank == 0:
        export_model(state, cfg, os.path.join(run_dir, "export"))


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint at the next step boundary and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _announce_flops(stage: Stage, dev: torch.device, precision: str, rank: int) -> float:
    """-> the device's peak FLOP/s (the MFU denominator), printed beside the stage's FLOPs per sample."""
    peak, peak_label = device_peak(dev, precision)
    if rank == 0 and stage.flops_per_sample:
        print(
            f"[{stage.name}] {stage.flops_per_sample / 1e9:.2f} GFLOP per sample (fwd+bwd); "
            f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_label})",
            flush=True,
        )
    return peak


def _forever(loader):
    """Endless batches; a finished pass (an exact epoch) starts the next one."""
    while True:
        yield from loader


def _write_history(run_dir: str, history: list[dict]) -> None:
    tmp = os.path.join(run_dir, "history.json.tmp")
    with open(tmp, "w") as f:
        json.dump(history, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "history.json"))


def _read_history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)
