"""Timing and result-writing helpers shared by the GPU-suite benchmarks.

- time_ms: on CUDA, triton.testing.do_bench (CUDA events around many launches, L2 flushed, median) or, when each
  call needs untimed set-up (backward-only modes), CUDA events around the call alone; on CPU, the median of
  perf_counter runs after a warm-up.
- JsonlWriter: appends one JSON row per measurement and flushes it at once, so a benchmark killed by the suite's
  timeout keeps every row it measured.
- precision_note: the matmul precision settings that decide whether fp32 GEMMs use TF32 tensor cores.
- bench_config: the config a training benchmark runs at its size (tiny, mid, paper), one owner for bench_train.py
  and its plain-torch baseline bench_train_eager.py.
- mfu_fields: the MFU columns both training benchmarks report, against the named datasheet peak
  (svq_fast.train.perf) and against a GEMM measured here in the run's precision.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, *, prepare=None, reps: int | None = None, budget_s: float = 1.0) -> tuple[float, int]:
    """Median ms of fn() (or fn(prepare()) with prepare untimed) -> (ms, timed runs)."""
    if device == "cuda" and prepare is None:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=10, rep=max(20, int(budget_s * 200)), return_mode="median")
        return float(ms), -1  # do_bench picks the repetition count itself
    call = (lambda st: fn(st)) if prepare is not None else (lambda st: fn())
    prep = prepare or (lambda: None)
    t0 = time.perf_counter()
    call(prep())  # warm-up (compile, allocator)
    sync(device)
    first = time.perf_counter() - t0
    n = reps or max(3, min(50, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        state = prep()
        sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call(state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call(state)
            times.append((time.perf_counter() - t0) * 1e3)
        state = None
    return statistics.median(times), n


def peak_mib(fn, device: str) -> float | None:
    """Extra CUDA memory fn() allocates at its peak (None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def precision_note() -> dict:
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


class JsonlWriter:
    """Append rows to a .jsonl file as they are measured (no-op without a path)."""

    def __init__(self, path: str | None, bench: str):
        self.path, self.bench = (Path(path) if path else None), bench
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> dict:
        row = {"bench": self.bench, **row}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row


# The step table's mid size (issue 20): the tiny architectures at twice the width (the GPT also twice as deep), still
# within a 2-core CPU's reach: a stage-1 training sample costs 19.0 GFLOP against the tiny 5.2 (3.6x), a stage-2 one
# 26.1 against 4.2 (6.2x), by the stacks' own FLOP counters.
MID_OVERRIDES = {
    "stage1": [
        "--model.ch=64",
        "--model.z_channels=64",
        "--model.semantic_z_channels=32",
        "--model.semantic_decoder_width=256",
        "--model.spade_hidden=64",
        "--loss.disc_ch=32",
    ],
    "stage2": ["--model.n_layer=8", "--model.n_head=8", "--model.n_embd=256"],
}


def bench_config(recipe: str, *, paper: bool = False, mid: bool = False):
    """-> the Stage1Config / Stage2Config a training benchmark measures: the paper-size configs, the tiny ones, or the
    tiny ones at the mid size (run.name says which)."""
    from svq_fast.config import apply_overrides
    from svq_fast.named_configs import get_config

    if paper and mid:
        raise ValueError("choose one size: --paper or --mid")
    if recipe not in MID_OVERRIDES:
        raise ValueError(f"unknown recipe {recipe!r}: expected one of {sorted(MID_OVERRIDES)}")
    base = {"stage1": "svqgan", "stage2": "gpt"}[recipe]
    cfg = get_config(f"{base}_f16_256" if paper else f"{base}_tiny")
    if mid:
        cfg = apply_overrides(cfg, MID_OVERRIDES[recipe])
        cfg.run.name = f"{base}_mid"
    return cfg


def gemm_peak_tflops(device: str, precision: str = "bf16", n: int = 8192) -> float:
    """Measured GEMM throughput in the run's precision (bf16; fp32 with this process's TF32 setting), TFLOP/s."""
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    n = n if device == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    ms, _ = time_ms(lambda: a @ b, device, budget_s=0.5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def mfu_fields(flops_per_sample: float, samples_per_s: float, device: str, precision: str, gemm_tflops: float) -> dict:
    """{mfu, mfu_peak (what the peak is), mfu_measured_peak, gemm_peak_tflops}: model FLOPs per second over the
    datasheet peak of this GPU in the run's precision (TF32 for fp32 with TF32 on), and over the measured GEMM."""
    from svq_fast.train.perf import device_peak

    peak, label = device_peak(torch.device(device), precision)
    rate = flops_per_sample * samples_per_s
    return {"mfu": rate / peak, "mfu_peak": label, "mfu_measured_peak": rate / (gemm_tflops * 1e12),
            "gemm_peak_tflops": gemm_tflops}  # fmt: skip
