"""Prints one table of the headline numbers found in a results folder (any of the benchmark JSON files)."""

from __future__ import annotations

import json
import os
import sys


def _load(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main(folder: str) -> int:
    device = _load(folder, "device.json") or {}
    print(
        f"device: {device.get('device')}  driver: {device.get('driver')}  torch: {device.get('torch')}  "
        f"triton: {device.get('triton')}"
    )
    for name in ("bench_vq.json", "bench_attention.json", "bench_sampling.json"):
        rows = _load(folder, name)
        if not rows:
            print(f"{name}: no results")
            continue
        print(f"{name}:")
        for r in rows if isinstance(rows, list) else rows.get("rows", []):
            keys = [
                k for k in ("provider", "mode", "mask", "dtype", "N", "K", "D", "B", "H", "T", "d", "batch") if k in r
            ]
            vals = [k for k in ("ms_median", "tflops", "tokens_per_s", "peak_mem_mib") if k in r]
            print(
                "  "
                + " ".join(f"{k}={r[k]}" for k in keys)
                + " | "
                + " ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in vals)
            )
    train = _load(folder, "bench_train.json")
    if train:
        print("bench_train.json:")
        for r in train["summary"] if isinstance(train, dict) else train:  # medians over repeats (older files: runs)
            print(
                f"  {r['recipe']:7s} {r['variant']:15s} {r['samples_per_s']:9.2f} samples/s  MFU {r['mfu']:.3f}  "
                f"peak {r['peak_mem_mib']:.0f} MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
