"""The training loop both stages share.

Read `run` top to bottom: resume -> for each step: `train_step` (data from `stage.loader`, forward, backward
and optimizer step inside `stage.micro_step`) -> logging window -> stop requests (SIGTERM, time limit) ->
checkpoint cadence -> test callbacks; then the final checkpoint and, for a finished run, the export.

Run identity: a fresh start draws a run id, a resume keeps the id of the checkpoint it continues; checkpoints
carry it, and pruning and resume=auto only look at the run's own (checkpoint.py, run_dir.py). SIGTERM (from the
scheduler, or sent by svq_fast.dist.watch_launcher when the launcher dies) stops every rank at the same step
boundary with a checkpoint; DataLoader workers ignore it, so the rank can still finish its step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from svq_fast import dist
from svq_fast.export import export_model
from svq_fast.train.checkpoint import (
    CheckpointError,
    checkpoint_run_id,
    full_state_dict,
    load_checkpoint,
    resume_candidates,
    save_checkpoint,
    verify_files,
)
from svq_fast.train.logger import RunLogger
from svq_fast.train.metrics import MetricsWindow
from svq_fast.train.perf import PhaseTimer, device_peak, profiler
from svq_fast.train.run_dir import new_run_id, read_run_id, record_run, release_lock


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

    decisions: StepDecisions | None = None  # set by `run`: the collective skip / stop decisions

    def micro_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Forward, backward and engine.step() for one micro-batch -> named 0-dim device tensors (detached; read on
        logging steps only); {} when a non-finite loss made every rank skip it. A stage asks `self.agree(flags)`
        whether to skip: never `.item()` or `bool()` on a device tensor here."""
        raise NotImplementedError

    def agree(self, *nonfinite: torch.Tensor) -> list[bool]:
        """Per flag (0-dim bool device tensors, e.g. `~torch.isfinite(loss)`): whether it is set on any rank; the
        run's stop request rides along (StepDecisions). Without a loop (a stage used alone): one any-rank check."""
        if self.decisions is None:
            self.decisions = StepDecisions(nonfinite[0].device if nonfinite else torch.device("cpu"))
        return self.decisions.agree(*nonfinite)

    def lr(self) -> float:
        return 0.0

    def log_images(self, step: int, log: RunLogger) -> None:
        """Image grids for TensorBoard at logging steps (optional)."""


class StepDecisions:
    """The decisions every rank must take alike during a step, agreed in ONE all-reduce and ONE host read per
    check: skip a micro-batch whose loss is non-finite on some rank, and stop the run because some rank got a
    SIGTERM or passed the time limit. A stage checks once per micro-batch before its backward (Stage.agree); the
    stop request rides along, so a step costs no collective of its own for it. The stop reason is the collective
    one: every rank prints the same."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.local: Callable[[], tuple[bool, bool]] = lambda: (False, False)  # (SIGTERM seen, over time) here
        self.preempted = self.over_time = False  # on some rank, as agreed
        self.checks = 0  # agreements so far (the loop adds one when a step made none)

    def agree(self, *nonfinite: torch.Tensor) -> list[bool]:
        n = len(nonfinite)
        flags = torch.zeros(n + 2, device=self.dev)  # device-side: no host-to-device copy of the flags
        for i, flag in enumerate(nonfinite):
            flags[i] = flag.reshape(())
        preempted, over_time = self.local()
        if preempted:
            flags[n] = 1.0
        if over_time:
            flags[n + 1] = 1.0
        bits = dist.any_rank_flags(flags)
        self.preempted |= bool(bits >> n & 1)
        self.over_time |= bool(bits >> (n + 1) & 1)
        self.checks += 1
        return [bool(bits >> i & 1) for i in range(n)]

    @property
    def stop(self) -> bool:
        return self.preempted or self.over_time

    @property
    def reason(self) -> str:
        return "preempted" if self.preempted else "max_seconds"


AfterStep = Callable[[int], None]  # called after each optimizer step is complete (and checkpointed, if due)


def run(
    cfg, stage: Stage, *, rank: int, world: int, dev: torch.device, run_dir: str, after_step: Sequence[AfterStep] = ()
) -> dict:
    opt = cfg.optim
    start, run_id, resumed = resume(cfg, stage, run_dir, rank)
    log = RunLogger(run_dir, rank=rank, total_steps=opt.max_steps, initial_step=start, tensorboard=cfg.log.tensorboard,
                    progress=cfg.log.progress, desc=stage.name)  # fmt: skip
    history = [h for h in _read_history(run_dir) if h["step"] <= start] if start else []
    peak = _announce_flops(stage, dev, cfg.zero.precision, rank)
    window = MetricsWindow(
        stage, micro_batch=opt.micro_batch, grad_accum=opt.grad_accum, world=world, dev=dev, peak=peak
    )
    guard = NonFiniteGuard(stage.name, cfg.run.max_nonfinite_skips, rank)
    _workers_ignore_sigterm(stage.loader)
    batches = _forever(stage.loader)
    t_start = time.perf_counter()
    step, stop_reason = start, "max_steps"
    decisions = stage.decisions = StepDecisions(dev)
    with _Preemption() as preempt:  # held through the final checkpoint: a late SIGTERM must not cut it short
        decisions.local = lambda: (
            preempt.requested,
            cfg.run.max_seconds > 0 and time.perf_counter() - t_start > cfg.run.max_seconds,
        )
        with profiler(cfg.log.profile, run_dir) as prof:
            while step < opt.max_steps:
                checks = decisions.checks
                with stage.timer.sampled((step + 1) % cfg.log.every == 0):  # one timed step per logging window
                    step_logs = train_step(stage, batches, step, opt.grad_accum, guard, window)
                if decisions.checks == checks:  # the stage made no check this step: agree on the stop alone
                    decisions.agree()
                window.add(step_logs)
                step += 1
                if prof is not None:
                    prof.step()
                last = step == opt.max_steps or decisions.stop  # every rank stops at the same step
                logging = step % cfg.log.every == 0 or last
                log.advance(window.means(stage.progress_keys) if logging else None)  # a read: logging steps only
                if logging:
                    history.append(log_window(step, stage, window, log, guard))
                if last:
                    if decisions.stop:
                        stop_reason = decisions.reason
                    break
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    checkpoint(run_dir, step, stage, history, cfg.run.keep_last, rank, run_id)
                for callback in after_step:
                    callback(step)
        log.close()
        if not (resumed and step == start):  # a resume that took no step: its checkpoint already holds this state
            checkpoint(run_dir, step, stage, history, cfg.run.keep_last, rank, run_id)
        if stop_reason != "preempted":  # a finished run, or one stopped by its time limit: the model as it is
            export(cfg, stage, rank, run_dir)
        if stop_reason != "max_steps" and rank == 0:
            print(f"[{stage.name}] stopped at step {step} ({stop_reason}); checkpoint saved"
                  + (", model exported" if stop_reason == "max_seconds" else "")
                  + ", resume with --run.resume=auto", flush=True)  # fmt: skip
    dist.barrier()
    release_lock(run_dir)  # taken by run_dir.prepare_run (rank 0); a no-op where not held
    return {
        "run_dir": run_dir,
        "run_id": run_id,
        "history": history,
        "step": step,
        "stop_reason": stop_reason,
        "train_seconds": time.perf_counter() - t_start,
        "tensorboard_seconds": log.write_seconds,  # rank 0's time in TensorBoard writer calls (0 elsewhere)
    }


def resume(cfg, stage: Stage, run_dir: str, rank: int) -> tuple[int, str, bool]:
    """Restore engines, RNG and loader position from the checkpoint run.resume names -> (the step to continue
    from, the run id, whether it resumed). Every candidate's files are checked against its manifest before
    DeepSpeed opens them; resume=auto skips a damaged one, says why, and takes the previous complete one of the
    same run. A fresh start draws a new run id and seeds this rank's stream (dropout, CFG / image-modality
    dropout)."""
    resume_dir, run_id = _choose_checkpoint(cfg.run.resume, run_dir, stage.name, rank)
    if not resume_dir:
        run_id = dist.broadcast_text(new_run_id() if rank == 0 else "")
        if rank == 0:
            record_run(run_dir, run_id, "start", 0)
        torch.manual_seed(cfg.run.seed * 1000 + rank)
        return 0, run_id, False
    client = load_checkpoint(resume_dir, stage.engines, verified=True)  # also restores this rank's RNG states
    if client.get("loader") is not None:
        stage.loader.load_state_dict(client["loader"])
    start = int(client.get("step", 0))
    if rank == 0:
        record_run(run_dir, run_id, "resume", start)
        print(f"[{stage.name}] resumed from {resume_dir} at step {start} (run {run_id})", flush=True)
        if cfg.optim.max_steps <= start:
            print(
                f"warning: [{stage.name}] optim.max_steps={cfg.optim.max_steps} is at or below the resumed step "
                f"{start}: no training step will run (raise --optim.max_steps to train further)",
                file=sys.stderr,
                flush=True,
            )
    return start, run_id, True


def _choose_checkpoint(resume_arg: str, run_dir: str, name: str, rank: int) -> tuple[str | None, str]:
    """Collective: the newest verified checkpoint run.resume asks for -> (its tag dir or None, its run id)."""
    found, error = [], ""
    owner = read_run_id(run_dir) if rank == 0 else ""
    if rank == 0:
        try:
            found = resume_candidates(run_dir, resume_arg, owner or None)
        except FileNotFoundError as e:
            error = str(e)
    blob = json.loads(dist.broadcast_text(json.dumps({"found": found, "error": error, "owner": owner})))
    if blob["error"]:
        raise CheckpointError(blob["error"])
    skipped = []
    for tag in blob["found"]:
        problems = verify_files(tag)
        if not problems:
            if skipped and rank == 0:
                print(f"[{name}] resuming from {tag}, the newest intact checkpoint", file=sys.stderr, flush=True)
            run_id = checkpoint_run_id(tag) or blob["owner"]  # an older version's checkpoint has none: a new one
            return tag, run_id or dist.broadcast_text(new_run_id() if rank == 0 else "")
        if resume_arg != "auto":
            raise CheckpointError(f"checkpoint {tag} is damaged: " + "; ".join(problems[:4]))
        skipped.append(tag)
        if rank == 0:
            print(
                f"warning: [{name}] checkpoint {tag} is damaged and is skipped: {'; '.join(problems[:4])}; "
                "falling back to the previous complete checkpoint",
                file=sys.stderr,
                flush=True,
            )
    if skipped:
        raise CheckpointError(f"no intact checkpoint to resume from in {run_dir}: every one is damaged ({skipped})")
    return None, ""


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
) -> dict[str, torch.Tensor]:
    """One optimizer step: grad_accum applied micro-batches (a skipped one is replaced by the next) -> their mean
    scalars (device tensors). The data comes from `batches`; the gradient is taken and applied inside
    stage.micro_step."""
    step_logs: dict[str, torch.Tensor] = {}
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


def checkpoint(
    run_dir: str, step: int, stage: Stage, history: list[dict], keep_last: int, rank: int, run_id: str = ""
) -> None:
    """Collective: every engine's state + RNG + loader position; rank 0 writes the curve so far beside it, so a
    resumed run continues it."""
    state = getattr(stage.loader, "state_dict", None)
    client = {"step": step, "loader": state() if state is not None else None}
    save_checkpoint(run_dir, step, stage.engines, client, keep_last, run_id=run_id)
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


class _IgnoreSigterm:
    """DataLoader worker_init_fn: the worker ignores SIGTERM (a job-wide SIGTERM reaches the workers too; the rank
    checkpoints and tears them down itself), then runs the loader's own worker_init_fn, if any."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def _workers_ignore_sigterm(loader) -> None:
    """Install _IgnoreSigterm on the DataLoader behind `loader` (itself, or one it wraps as `.loader`)."""
    for _ in range(4):
        if isinstance(loader, DataLoader):
            if not isinstance(loader.worker_init_fn, _IgnoreSigterm):
                loader.worker_init_fn = _IgnoreSigterm(loader.worker_init_fn)
            return
        loader = getattr(loader, "loader", None)


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
