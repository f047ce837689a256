"""Benchmark the sVQ encoder's semantic input layer: fused semantic_conv vs one-hot + conv2d.

    python benchmarks/bench_semantic_io.py                                   # CPU: B=2 128x128, < 3 minutes
    python benchmarks/bench_semantic_io.py --shapes 8x256x256 --reps 1       # CPU: the paper shape (minutes)
    python benchmarks/bench_semantic_io.py --device cuda --dtype bf16        # GPU: 8x256x256 and 2x128x128
    python benchmarks/bench_semantic_io.py --out rows.json --md table.md

The layer: labels (B, H, W) int64 with C=243 classes (ignore id 255) -> (B, Cout=128, H, W), 3x3 kernel, bias
(the paper's first-layer width). Labels are piecewise constant like real segmentation maps: 16x16-pixel cells
(8x8 below 256 pixels) with random class ids, 5% of the cells ignore.

Providers (same as tests/kernels/test_semantic_conv.py):
  native         semantic_conv(backend="native"): the C++/OpenMP op (CPU only)
  triton         semantic_conv(backend="triton"): compiled Triton, deterministic backward (CUDA only; the CPU
                 interpreter is a correctness path, not a performance path)
  triton_atomic  the same with deterministic=False (atomic weight-gradient scatter; CUDA only)
  ref            semantic_conv_ref: F.one_hot -> (B, C, H, W) in the weight dtype -> F.conv2d (cuDNN / oneDNN)
Modes: forward (weight and bias require grad, as in training, so ref's graph keeps its one-hot alive), backward
(the forward runs untimed first; upstream gradient a fixed random (B, Cout, H, W)), forward+backward.

Each (provider, shape, mode) runs in fresh Python processes (one for memory, one for time): no allocator state,
cached buffers or high-water marks shared between measurements.
Time, `ms_median`: median of `--reps` wall-clock runs after one warm-up run (fewer when one run exceeds
--budget-s; at least 1); CUDA runs are synchronised before and after.
Peak memory, `peak_mem_mib`: memory allocated during the call on top of what existed before it (inputs, and for
backward mode the forward's output and saved tensors, are excluded; outputs, saved tensors and gradients made
during the call are included).
  CUDA: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() before, after reset_peak_memory_stats().
  CPU:  the growth of the process's peak resident set size during one call after a warm-up call (which pages in
        code and starts threads): /proc/self/clear_refs is written with 5 (resets VmHWM to the current RSS) right
        before the call, and VmHWM - VmRSS(before) is read after it. This counts everything the call touches
        (oneDNN buffers, the native op's scratch), not only torch's allocator. Memory is measured in its own
        process with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so freed blocks leave RSS
        and the warm-up call's freed memory cannot hide the measured call's peak; timing runs in another process
        with default allocator settings. `alloc_peak_mib` (CPU only) is the torch-allocator view of a third call,
        from torch.profiler(profile_memory=True) allocation events, for cross-checking.
Ratios printed per shape and mode: time_vs_ref = ms / ms_ref, mem_vs_ref = peak / peak_ref, from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from device_info import cpu_name  # benchmarks/device_info.py (the script folder is on sys.path)
from memory import cpu_alloc_peak_mib  # benchmarks/memory.py (the script folder is on sys.path)

PROVIDERS = ("native", "triton", "triton_atomic", "ref")
MODES = ("forward", "backward", "forward+backward")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_CLASSES, COUT, KSIZE, IGNORE = 243, 128, 3, 255
DEFAULT_SHAPES = {"cpu": "2x128x128", "cuda": "8x256x256,2x128x128"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--shapes", default=None, help="BxHxW[,BxHxW...] (default: cpu 2x128x128; cuda also 8x256x256)")
    p.add_argument("--classes", type=int, default=NUM_CLASSES)
    p.add_argument("--cout", type=int, default=COUT)
    p.add_argument("--providers", default=None, help=f"comma list from {PROVIDERS} (default: those for the device)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list from {MODES}")
    p.add_argument("--reps", type=int, default=None, help="timed runs per row (default: cpu 5, cuda 20)")
    p.add_argument("--budget-s", type=float, default=6.0, help="cap on timed seconds per row (at least 1 run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the rows as a JSON list here")
    p.add_argument("--md", default=None, help="write a markdown table (with the machine named) here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: provider:BxHxW:mode -> JSON row
    p.add_argument("--measure", default="time", choices=["time", "mem"], help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    args.shapes = args.shapes or DEFAULT_SHAPES[args.device]
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    if args.providers is None:
        args.providers = "native,ref" if args.device == "cpu" else "triton,triton_atomic,ref"
    args.providers = [s for s in args.providers.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    args.reps = args.reps or (5 if args.device == "cpu" else 20)
    for name, got, allowed in (("provider", args.providers, PROVIDERS), ("mode", args.modes, MODES)):
        bad = [g for g in got if g not in allowed]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {allowed}")
    if any(len(s) != 3 for s in args.shapes):
        p.error("--shapes takes BxHxW triples, e.g. 8x256x256")
    return args


# -- one (provider, shape, mode), inside a worker process --------------------------------------------------------


def _unavailable(provider: str, device: str) -> str | None:
    if provider.startswith("triton") and device != "cuda":
        return "triton runs on CUDA only here (the CPU interpreter is a correctness path, not a performance path)"
    if provider == "native":
        from svq_fast._ext import native_available, native_error

        if device != "cpu":
            return "the native op is CPU-only"
        if not native_available():
            return f"native extension not built ({native_error()})"
    return None


def make_labels(b: int, h: int, w: int, c: int, gen: torch.Generator) -> torch.Tensor:
    """(b, h, w) int64: piecewise-constant cells of random classes, 5% of the cells ignore."""
    cell = 16 if min(h, w) >= 256 else 8
    ch, cw = -(-h // cell), -(-w // cell)
    cells = torch.randint(0, c, (b, ch, cw), generator=gen)
    cells[torch.rand(b, ch, cw, generator=gen) < 0.05] = IGNORE
    return cells.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :h, :w].contiguous()


def _rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                vals[key] = int(val.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def run_worker(args) -> dict:
    provider, shape, mode = args.worker.split(":")
    b, h, w = (int(v) for v in shape.split("x"))
    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    row = dict(provider=provider, device=device, B=b, H=h, W=w, C=args.classes, Cout=args.cout, mode=mode,
               dtype=args.dtype, threads=torch.get_num_threads())  # fmt: skip
    why = _unavailable(provider, device)
    if why:
        return {**row, "skipped": why}
    from svq_fast.kernels.semantic_conv import semantic_conv, semantic_conv_ref

    gen = torch.Generator().manual_seed(0)
    labels = make_labels(b, h, w, args.classes, gen).to(device)  # (B, H, W)
    weight = (torch.randn(args.cout, args.classes, KSIZE, KSIZE, generator=gen) * 0.05).to(device, dtype)
    weight.requires_grad_()  # (Cout, C, k, k)
    bias = torch.randn(args.cout, generator=gen).to(device, dtype).requires_grad_()  # (Cout,)
    g = torch.randn(b, args.cout, h, w, generator=gen).to(device, dtype)  # (B, Cout, H, W) upstream gradient

    if provider == "ref":

        def fwd():
            return semantic_conv_ref(labels, weight, bias, IGNORE)
    else:
        backend = "triton" if provider.startswith("triton") else provider
        det = provider != "triton_atomic"

        def fwd():
            return semantic_conv(labels, weight, bias, ignore_index=IGNORE, backend=backend, deterministic=det)

    def prepare():
        weight.grad = bias.grad = None
        return fwd() if mode == "backward" else None

    def call(state):
        if mode == "backward":
            state.backward(g)
            return None
        out = fwd()
        if mode == "forward+backward":
            out.backward(g)
            return None
        return out  # forward: the output (and ref's saved one-hot) stay alive until the caller drops them

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run_once():
        state = prepare()
        sync()
        t0 = time.perf_counter()
        res = call(state)
        sync()
        dt = time.perf_counter() - t0
        del res, state
        return dt

    first = run_once()  # warm-up: code paging, kernel compilation / autotuning, allocator growth
    if args.measure == "mem":
        state = prepare()
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            res = call(state)  # kept alive until the peak is read: a forward's output counts
            sync()
            row["peak_mem_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            del res
        else:
            rss0, _ = _rss_mib()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            res = call(state)
            _, hwm = _rss_mib()
            row["peak_mem_mib"] = round(hwm - rss0, 1)
            del res
            state = prepare()
            row["alloc_peak_mib"] = round(cpu_alloc_peak_mib(lambda: call(state)), 1)
        del state
        return row
    n = max(1, min(args.reps, int(args.budget_s / max(first, 1e-6))))
    times = [run_once() for _ in range(n)]
    row["ms_median"] = round(statistics.median(times) * 1e3, 2)
    row["reps"] = n
    print(f"  {provider:13s} {shape:10s} {mode:17s} {row['ms_median']:10.2f} ms ({n} reps)", file=sys.stderr,
          flush=True)  # fmt: skip
    return row


# -- driver ------------------------------------------------------------------------------------------------------


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}"


def table(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "skipped" not in r]
    ref = {(r["B"], r["H"], r["W"], r["mode"]): r for r in ok if r["provider"] == "ref"}
    cpu = any(r["device"] == "cpu" for r in ok)
    head = "| provider | B x H x W | C | Cout | mode | ms (median) | peak MiB |"
    head += " alloc peak MiB |" if cpu else ""
    head += " time vs ref | mem vs ref |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in ok:
        base = ref.get((r["B"], r["H"], r["W"], r["mode"]))
        tr = f"{r['ms_median'] / base['ms_median']:.3f}" if base else "-"
        mr = f"{r['peak_mem_mib'] / base['peak_mem_mib']:.3f}" if base and base["peak_mem_mib"] > 0 else "-"
        line = f"| {r['provider']} | {r['B']}x{r['H']}x{r['W']} | {r['C']} | {r['Cout']} | {r['mode']} | "
        line += f"{r['ms_median']:.2f} | {r['peak_mem_mib']:.1f} |"
        line += f" {r.get('alloc_peak_mib', '-')} |" if cpu else ""
        lines.append(line + f" {tr} | {mr} |")
    for r in rows:
        if "skipped" in r:
            lines.append(f"\nnote: {r['provider']} {r['mode']} skipped: {r['skipped']}")
    return lines


def _worker_env(measure: str) -> dict:
    """Memory workers use a fixed glibc mmap threshold: allocations >= 128 KiB are mmapped and unmapped on free, so
    RSS follows live memory (with glibc's default adaptive threshold, memory freed by the warm-up call can stay
    resident and hide the measured call's peak). Timing workers run with the default allocator settings."""
    env = dict(os.environ)
    if measure == "mem":
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    return env


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "-"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    t_start = time.perf_counter()
    name = machine(args.device)
    load0 = _loadavg()
    print(f"# bench_semantic_io on {name}, dtype {args.dtype}, load average {load0}", flush=True)
    passthrough = ["--device", args.device, "--dtype", args.dtype, "--reps", str(args.reps), "--budget-s",
                   str(args.budget_s), "--threads", str(args.threads), "--classes", str(args.classes),
                   "--cout", str(args.cout)]  # fmt: skip
    rows = []
    for b, h, w in args.shapes:
        for mode in args.modes:
            for provider in args.providers:
                spec = f"{provider}:{b}x{h}x{w}:{mode}"
                row = {}
                for measure in ("mem", "time"):
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--measure", measure,
                           *passthrough]  # fmt: skip
                    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_worker_env(measure))
                    if res.returncode != 0:
                        row = dict(provider=provider, B=b, H=h, W=w, mode=mode,
                                   skipped=f"{measure} worker failed with exit code {res.returncode}")  # fmt: skip
                        break
                    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
                    if "skipped" in row:
                        break
                rows.append(row)
    lines = table(rows)
    print("\n".join(lines))
    total = time.perf_counter() - t_start
    print(f"# total {total:.0f} s, load average at the end {_loadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([r for r in rows if "skipped" not in r], f, indent=1)
    if args.md:
        threads = sorted({r["threads"] for r in rows if "threads" in r})
        cmd = "python benchmarks/bench_semantic_io.py " + " ".join(argv if argv is not None else sys.argv[1:])
        head = [
            "# bench_semantic_io",
            "",
            f"`{cmd.strip()}`",
            "",
            f"- machine: {name}, torch threads {threads}",
            f"- dtype: {args.dtype}; C={args.classes}, Cout={args.cout}, k={KSIZE}",
            f"- load average (1/5/15 min) at start: {load0}; at end: {_loadavg()}; total {total:.0f} s",
            "",
        ]
        with open(args.md, "w") as f:
            f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
