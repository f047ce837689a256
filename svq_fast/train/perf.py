"""Performance accounting for the training loop: model FLOPs, device peak, MFU, phase times, peak memory,
and the optional torch.profiler capture.

FLOPs are counted once per run with torch's FlopCounterMode on a fresh copy of the model whose fused ops use
their pure-torch reference (so the Triton kernels, which no profiler sees, are counted by the same formulas
as the GEMMs they replace: 2*N*K*D for the codebook distances, 4*T*T*d per head for attention, counted full
as in the usual MFU convention).
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable

import torch

# Dense tensor-core peaks (FLOP/s) of common training GPUs, by dtype; fp32 means plain FP32 (no TF32).
_GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
}
_cpu_peak_cache: dict[str, float] = {}


def count_flops(fn: Callable[[], None]) -> int:
    """Total FLOPs of the aten ops that fn() runs (forward and backward if fn calls backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measured_cpu_peak(dtype: str = "fp32") -> float:
    """FLOP/s of the fastest of several 1024^3 GEMMs on this CPU with the current thread count (measured once,
    cached). On a shared machine it can still underestimate the peak, so CPU MFU is indicative only."""
    if dtype not in _cpu_peak_cache:
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        # a private generator: drawing from the global one would shift the training stream at whichever step this
        # first runs, and a resumed process runs it again at a different step, so resumed runs would diverge
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(1024, 1024, generator=gen).to(torch_dtype)
        b = torch.randn(1024, 1024, generator=gen).to(torch_dtype)
        a @ b
        best = float("inf")
        for _ in range(7):  # best single GEMM: other load on the machine only ever slows a trial down
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _cpu_peak_cache[dtype] = 2 * 1024**3 / best
    return _cpu_peak_cache[dtype]


def device_peak(dev: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained)."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks[precision], f"{key} datasheet {precision} dense"
        return float("nan"), f"unknown GPU {name!r}"
    return measured_cpu_peak(precision if precision != "fp16" else "fp32"), "CPU, measured 1024^3 GEMM"


def peak_memory_mib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB (process peak RSS)


class PhaseTimer:
    """Wall time per phase (forward / backward / optimizer) of sampled steps; synchronises CUDA only when on."""

    def __init__(self, dev: torch.device):
        self.dev, self.enabled = dev, False
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def sampled(self, on: bool):
        """Time the phases inside this block only when `on` (the loop samples one step per logging window)."""
        self.enabled = on
        try:
            yield
        finally:
            self.enabled = False

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        t0 = time.perf_counter()
        yield
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - t0

    def pop_fractions(self) -> dict[str, float]:
        total = sum(self.totals.values())
        out = {f"time/{k}_fraction": v / total for k, v in self.totals.items()} if total else {}
        self.totals = {}
        return out


def profiler(enabled: bool, run_dir: str):
    """A torch.profiler with a wait/warmup/active schedule writing TensorBoard traces to <run_dir>/profile."""
    if not enabled:
        return contextlib.nullcontext(None)
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    trace_dir = os.path.join(run_dir, "profile")
    return profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=tensorboard_trace_handler(trace_dir),
        record_shapes=True,
        profile_memory=True,
    )
