"""The training loop both stages share: resume, micro-batches with gradient accumulation, rank-reduced
logging windows, non-finite guards, time limits and preemption (SIGTERM), checkpoints and the final export.

A stage supplies its engines and a `micro_step(batch, step) -> {name: float}` that runs forward, backward
and engine.step() for one micro-batch (returning {} when it skipped a non-finite loss).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from svq_fast import dist
from svq_fast.dist import all_reduce_mean, any_rank
from svq_fast.export import export_model
from svq_fast.train.checkpoint import full_state_dict, load_checkpoint, resolve_resume, save_checkpoint
from svq_fast.train.logger import RunLogger
from svq_fast.train.perf import PhaseTimer, device_peak, peak_memory_mib, profiler


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Stage:
    name: str
    engines: dict  # name -> DeepSpeed engine; the first one is exported at the end
    micro_step: Callable[[dict, int], dict[str, float]]
    loader: Any  # iterable of this rank's micro-batches with state_dict() / load_state_dict() (exact resume)
    throughput: Callable[[int, float], dict[str, float]]  # (samples this rank, seconds) -> scalars
    on_log: Callable[[int, RunLogger], None] | None = None  # extra logging (images) at logging steps
    lr: Callable[[], float] = lambda: 0.0
    flops_per_sample: float = 0.0  # model FLOPs of one sample's forward + backward (see perf.count_flops)
    timer: PhaseTimer | None = None  # filled by the stage's micro_step on sampled steps
    progress_keys: tuple[str, ...] = ("loss",)  # window means shown in the progress bar (those present)


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


def run(cfg, stage: Stage, *, rank: int, world: int, dev: torch.device, run_dir: str) -> dict:
    opt = cfg.optim
    start = 0
    resume_dir = resolve_resume(run_dir, cfg.run.resume)
    if resume_dir:
        client = load_checkpoint(resume_dir, stage.engines)  # also restores this rank's RNG states
        start = int(client.get("step", 0))
        if client.get("loader") is not None:
            stage.loader.load_state_dict(client["loader"])
        if rank == 0:
            print(f"[{stage.name}] resumed from {resume_dir} at step {start}", flush=True)
    else:
        torch.manual_seed(cfg.run.seed * 1000 + rank)  # per-rank stream (dropout, CFG / image-modality dropout)
    batches = _forever(stage.loader)
    kill_at = int(os.environ.get("SVQ_FAST_TEST_KILL_AT_STEP", "0"))  # crash-test hook: SIGKILL after that step
    log = RunLogger(
        run_dir,
        rank=rank,
        total_steps=opt.max_steps,
        initial_step=start,
        tensorboard=cfg.log.tensorboard,
        progress=cfg.log.progress,
        desc=stage.name,
    )
    history: list[dict] = _read_history(run_dir) if start else []
    history = [h for h in history if h["step"] <= start]
    window: dict[str, float] = {}
    counts: dict[str, int] = {}  # steps in the window that reported each key (some are logged only on some steps)
    n_window, skipped_in_row, skipped_total = 0, 0, 0
    t_start = t_window = time.perf_counter()
    write_seen = 0.0
    data_time = 0.0
    step = start
    stop_reason = "max_steps"
    peak, peak_label = device_peak(dev, cfg.zero.precision)
    if rank == 0 and stage.flops_per_sample:
        print(
            f"[{stage.name}] {stage.flops_per_sample / 1e9:.2f} GFLOP per sample (fwd+bwd); "
            f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_label})",
            flush=True,
        )
    with _Preemption() as preempt, profiler(cfg.log.profile, run_dir) as prof:
        while step < opt.max_steps:
            if stage.timer is not None:  # time the phases of one step per logging window (syncs CUDA)
                stage.timer.enabled = (step + 1) % cfg.log.every == 0
            step_logs: dict[str, float] = {}
            applied = 0
            while applied < opt.grad_accum:  # a skipped micro-batch is replaced by the next one
                t0 = time.perf_counter()
                batch = next(batches)
                data_time += time.perf_counter() - t0
                logs = stage.micro_step(batch, step)
                if not logs:  # a non-finite loss on some rank: every rank skipped this micro-batch
                    skipped_in_row += 1
                    skipped_total += 1
                    if rank == 0:
                        print(
                            f"[{stage.name}] step {step}: non-finite loss, micro-batch skipped "
                            f"({skipped_in_row} in a row)",
                            flush=True,
                        )
                    if skipped_in_row >= cfg.run.max_nonfinite_skips:
                        raise NonFiniteLossError(
                            f"{stage.name}: {skipped_in_row} consecutive non-finite losses at step {step}; stopping. "
                            "Lower optim.lr, check the data (a bad shard?), or resume from the last checkpoint."
                        )
                    continue
                skipped_in_row = 0
                applied += 1
                for k, v in logs.items():
                    step_logs[k] = step_logs.get(k, 0.0) + v / opt.grad_accum
            for k, v in step_logs.items():
                window[k] = window.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            n_window += 1
            step += 1
            if prof is not None:
                prof.step()
            log.advance({k: window[k] / counts[k] for k in stage.progress_keys if k in window})
            over_time = cfg.run.max_seconds > 0 and time.perf_counter() - t_start > cfg.run.max_seconds
            stop = any_rank(preempt.requested or over_time, dev)
            last = step == opt.max_steps or stop
            if step % cfg.log.every == 0 or last:
                elapsed = time.perf_counter() - t_window
                means = all_reduce_mean({k: v / counts[k] for k, v in window.items()}, dev)
                samples = n_window * opt.micro_batch * opt.grad_accum
                scalars = {f"loss/{k}": v for k, v in means.items()}
                scalars.update(stage.throughput(samples, elapsed))
                perf = {
                    "throughput/data_wait_fraction": data_time / elapsed,
                    "memory/peak_mib": peak_memory_mib(dev),
                }
                if stage.flops_per_sample:
                    perf["throughput/mfu"] = stage.flops_per_sample * samples / elapsed / peak
                perf = all_reduce_mean(perf, dev)
                if stage.timer is not None:
                    perf.update(stage.timer.pop_fractions())
                grad_norm = _grad_norm(stage)
                if grad_norm is not None:
                    perf["grad_norm"] = grad_norm
                scale = _loss_scale(stage)
                if scale is not None:
                    perf["loss_scale"] = scale
                # the previous window's TensorBoard writes as a share of this window (0 with tensorboard off)
                perf["time/tensorboard_fraction"] = (log.write_seconds - write_seen) / elapsed
                write_seen = log.write_seconds
                scalars.update(perf)
                scalars.update({"lr": stage.lr(), "guard/skipped_microbatches": float(skipped_total)})
                log.scalars(step, scalars)
                history.append(
                    {"step": step, **means, **{k: v for k, v in scalars.items() if not k.startswith("loss/")}}
                )
                if stage.on_log is not None and log.writer is not None:  # image grids: only for TensorBoard
                    before, t0 = log.write_seconds, time.perf_counter()
                    stage.on_log(step, log)
                    log.write_seconds = before + time.perf_counter() - t0  # building the grid counts too
                window, counts, n_window, t_window, data_time = {}, {}, 0, time.perf_counter(), 0.0
            if last:
                if stop:
                    stop_reason = "preempted" if preempt.requested else "max_seconds"
                break
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                save_checkpoint(run_dir, step, stage.engines, _client_state(step, stage), cfg.run.keep_last)
                if rank == 0:  # the curve so far goes with the checkpoint, so a resumed run continues it
                    _write_history(run_dir, history)
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    log.close()
    save_checkpoint(run_dir, step, stage.engines, _client_state(step, stage), cfg.run.keep_last)
    if rank == 0:
        _write_history(run_dir, history)
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


def _grad_norm(stage: Stage) -> float | None:
    engine = next(iter(stage.engines.values()))
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    return None if norm is None else float(norm)


def _loss_scale(stage: Stage) -> float | None:
    engine = next(iter(stage.engines.values()))
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None) if getattr(engine, "fp16_enabled", lambda: False)() else None
    return None if scale is None else float(scale)


def _client_state(step: int, stage: Stage) -> dict:
    state = getattr(stage.loader, "state_dict", None)
    return {"step": step, "loader": state() if state is not None else None}


def _forever(loader):
    """Endless batches; a finished pass (an exact epoch) starts the next one."""
    while True:
        yield from loader


def export(cfg, stage: Stage, rank: int, run_dir: str) -> None:
    """Collective under ZeRO-3 (the weights are gathered); rank 0 writes <run_dir>/export."""
    state = full_state_dict(next(iter(stage.engines.values())))
    if rank == 0:
        export_model(state, cfg, os.path.join(run_dir, "export"))


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
