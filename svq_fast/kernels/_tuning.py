"""Shared tuning switches for the Triton kernels.

By default every kernel launches one pinned config per (kernel, dtype, shape class), chosen so that it compiles
for sm_90a (triton 3.6) with 0 spilled bytes and <= 227 KiB of shared memory (benchmarks/check_sm90.py checks
this). Autotuning is opt-in, `SVQ_FAST_AUTOTUNE=1`, over at most 4 candidates per kernel: a cold autotune
compiles every candidate (1-3 s each) per key, which a short GPU lease cannot afford.
"""

from __future__ import annotations

import os

MAX_CANDIDATES = 4


def autotune_enabled() -> bool:
    """Read at every launch, so tests and benchmarks can flip it per call."""
    return os.environ.get("SVQ_FAST_AUTOTUNE", "0") == "1"


def pow2_bucket(x: int, lo: int = 16, hi: int = 1 << 20) -> int:
    """Next power of two of x, clamped to [lo, hi]: autotune keys on the bucket, not the exact size."""
    x = max(int(x), lo)
    return min(1 << (x - 1).bit_length(), hi)
