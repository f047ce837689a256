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

# Dense (no 2:4 sparsity) datasheet peaks in TFLOP/s of the training GPUs, the one table of them (NVIDIA H100 / H200 /
# A100 datasheets; their "with sparsity" figures halved). "fp32" is plain FP32 on the CUDA cores, "tf32" the tensor
# cores on fp32 inputs. Matched against torch.cuda.get_device_name by the first key contained in the name, so the
# specific variants come first: "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL"; the SXM parts report
# "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GH200 480GB"; A100 SXM and PCIe have the same peaks.
GPU_PEAKS_TFLOPS = {
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "GH200": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 67.0},
    "H200": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 67.0},  # SXM
    "H100": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 67.0},  # SXM ("H100 80GB HBM3")
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
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


def tf32_enabled() -> bool:
    """Whether fp32 work may run on TF32 tensor cores: cuDNN convolutions (torch.backends.cudnn.allow_tf32, on by
    default) or matmuls (float32 matmul precision "high"/"medium", or torch.backends.cuda.matmul.allow_tf32)."""
    return bool(
        torch.backends.cudnn.allow_tf32
        or torch.backends.cuda.matmul.allow_tf32
        or torch.get_float32_matmul_precision() != "highest"
    )


def gpu_peak(name: str, precision: str, tf32: bool) -> tuple[float, str]:
    """(dense peak FLOP/s, label naming it) of the GPU called `name` for a run in `precision` ("fp32" | "bf16" |
    "fp16"): an fp32 run with TF32 on is measured against the TF32 peak (its convolutions / GEMMs run there; the fp32
    peak would let MFU exceed 1). (nan, why) for a GPU not in GPU_PEAKS_TFLOPS."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"gpu_peak: precision {precision!r} is not one of fp32, bf16, fp16")
    column = "tf32" if precision == "fp32" and tf32 else precision
    for key, peaks in GPU_PEAKS_TFLOPS.items():
        if key in name:
            why = " (fp32 run, TF32 on)" if column == "tf32" else " (fp32 run, TF32 off)" if precision == "fp32" else ""
            value = peaks[column]
            return value * 1e12, f"{key} datasheet {column.upper()} dense {value:g} TFLOP/s{why}"
    return float("nan"), f"unknown GPU {name!r}: no datasheet peak in svq_fast/train/perf.py GPU_PEAKS_TFLOPS"


def device_peak(dev: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, label naming the peak): the datasheet table on CUDA (gpu_peak), a measured GEMM
    on the CPU."""
    if dev.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(dev), precision, tf32_enabled())
    dtype = "bf16" if precision == "bf16" else "fp32"
    return measured_cpu_peak(dtype), f"CPU, measured {dtype} 1024^3 GEMM"


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
