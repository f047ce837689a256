"""A logging window of the training loop: per-key means over the steps that reported each key, throughput,
MFU, data wait, phase times, memory and engine health, reduced over ranks once per window.

The steps' scalars arrive as device tensors and are summed on the device; the host reads them once per window
(one all-reduce of one stacked tensor, one read), as torchtitan and nanoGPT do: a step that does not log never
waits for the GPU."""

from __future__ import annotations

import time

import torch

from svq_fast.dist import all_reduce_mean, all_reduce_mean_tensors
from svq_fast.train.perf import peak_memory_mib


class MetricsWindow:
    def __init__(self, stage, *, micro_batch: int, grad_accum: int, world: int, dev: torch.device, peak: float):
        self.stage, self.world, self.dev, self.peak = stage, world, dev, peak
        self.samples_per_step = micro_batch * grad_accum  # per rank
        self.tensorboard_seen = 0.0  # RunLogger.write_seconds at the end of the previous window
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # 0-dim fp32 device tensors
        self.counts: dict[str, int] = {}  # steps that reported each key (some are logged only on some steps)
        self.steps = 0
        self.data_seconds = 0.0
        self.t0 = time.perf_counter()

    def add(self, step_logs: dict[str, torch.Tensor]) -> None:
        """One optimizer step's scalars (device tensors, already averaged over its micro-batches); no host read."""
        for k, v in step_logs.items():
            v = torch.as_tensor(v, dtype=torch.float32, device=self.dev).detach()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def mean_tensors(self, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """This rank's window means as device tensors (all keys, or those of `keys` that were reported)."""
        keys = tuple(self.sums) if keys is None else tuple(k for k in keys if k in self.sums)
        return {k: self.sums[k] / self.counts[k] for k in keys}

    def means(self, keys: tuple[str, ...] | None = None) -> dict[str, float]:
        """This rank's window means, read to the host (one read): for logging steps only."""
        means = self.mean_tensors(keys)
        if not means:
            return {}
        return dict(zip(means, torch.stack(list(means.values())).tolist()))

    def reduce(self, tensorboard_seconds: float) -> tuple[dict[str, float], dict[str, float]]:
        """Collective: -> (rank-mean losses, every other scalar) of the window (the caller then reset()s it).
        tensorboard_seconds: the logger's total writer time so far (its share of this window is reported)."""
        if self.dev.type == "cuda":  # the window's queued work belongs to it: steps do not synchronise any more
            torch.cuda.synchronize(self.dev)
        elapsed = time.perf_counter() - self.t0
        stage = self.stage
        losses = all_reduce_mean_tensors(self.mean_tensors())
        samples = self.steps * self.samples_per_step  # this rank's
        unit, per_sample = stage.throughput_unit
        scalars = {
            "throughput/samples_per_s": samples * self.world / elapsed,
            f"throughput/{unit}_per_s_per_rank": samples * per_sample / elapsed,
        }
        perf = {
            "throughput/data_wait_fraction": self.data_seconds / elapsed,
            "memory/peak_mib": peak_memory_mib(self.dev),
        }
        if stage.flops_per_sample:
            perf["throughput/mfu"] = stage.flops_per_sample * samples / elapsed / self.peak
        perf = all_reduce_mean(perf, self.dev)
        perf.update(stage.timer.pop_fractions())
        perf.update(engine_health(next(iter(stage.engines.values()))))
        # the previous window's TensorBoard writes as a share of this window (0 with tensorboard off)
        perf["time/tensorboard_fraction"] = (tensorboard_seconds - self.tensorboard_seen) / elapsed
        self.tensorboard_seen = tensorboard_seconds
        scalars.update(perf)
        return losses, scalars


def engine_health(engine) -> dict[str, float]:
    """The engine's global gradient norm and, under fp16, its loss scale (those it reports)."""
    out = {}
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is not None:
        out["grad_norm"] = float(norm)
    fp16 = getattr(engine, "fp16_enabled", lambda: False)()
    scale = getattr(getattr(engine, "optimizer", None), "cur_scale", None) if fp16 else None
    if scale is not None:
        out["loss_scale"] = float(scale)
    return out
