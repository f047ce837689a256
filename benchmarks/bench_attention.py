"""Benchmark attention providers: Triton flash attention, each SDPA backend, xformers, and the reference.

    python benchmarks/bench_attention.py                       # CPU: small shape, fp32, no triton
    python benchmarks/bench_attention.py --device cuda         # the issue shapes in bf16
    python benchmarks/bench_attention.py --shapes 32,16,512,64 --masks causal --modes fwd+bwd --out r.json

Rows: provider x shape (B,H,T,d) x mask (causal | prefix, P = T/2) x mode (fwd | bwd | fwd+bwd), with the
median time, TFLOP/s, peak memory (CUDA) and the speed ratio to the fastest SDPA backend in the same run
(`vs_sdpa` = t_best_sdpa / t: > 1 is faster than SDPA).

FLOPs (matmul only, the usual convention): forward 4*B*H*T*T*d for full attention, times the visible
fraction of the score matrix: 1/2 for causal, (T^2 + P^2) / (2 T^2) for prefix-causal (5/8 at P = T/2).
Backward counts 2.5x the forward, forward+backward 3.5x.

SDPA with a prefix-causal mask needs an explicit boolean (T, T) mask: its flash backend refuses that
(reported as `unsupported`), efficient/math/cudnn take it. The Triton kernel runs on CUDA only unless
requested on CPU explicitly (the interpreter is a correctness path, not a performance path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import JsonlWriter, precision_note  # benchmarks/bench_common.py
from device_info import cpu_name  # benchmarks/device_info.py (the script folder is on sys.path)

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH",
                 "sdpa-cudnn": "CUDNN_ATTENTION"}  # fmt: skip
ALL_PROVIDERS = ["triton", *SDPA_BACKENDS, "xformers", "ref"]
# (B, H, T, d): the stage-2 GPT (T 512-1024, d 64) and long sequences at d = 128 (T 2048-8192, ~64k tokens each)
CUDA_SHAPES = [(32, 16, 512, 64), (16, 16, 1024, 64), (8, 16, 2048, 128), (4, 16, 4096, 128), (1, 16, 8192, 128)]
CPU_SHAPES = [(2, 4, 256, 64)]
MODES = ("fwd", "bwd", "fwd+bwd")
MASKS = ("causal", "prefix")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: bf16 cuda, fp32 cpu")
    p.add_argument("--shapes", default=None, help="B,H,T,d[;B,H,T,d...] (default: issue shapes on cuda)")
    p.add_argument("--providers", default=None, help=f"comma list from {ALL_PROVIDERS} (default: all usable)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--masks", default=",".join(MASKS))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions on CPU (default: time-budgeted)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU default 1: on a shared box, OpenMP barriers under "
                   "oversubscription made 2-thread timings 10-500x slower and erratic)")  # fmt: skip
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--jsonl", default=None, help="append each row to this .jsonl file as it is measured")
    p.add_argument("--md", default=None, help="also write the table as markdown here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.shapes:
        args.shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s.strip()]
        if any(len(s) != 4 for s in args.shapes):
            p.error("--shapes: each shape is B,H,T,d")
    else:
        args.shapes = CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES
    if args.providers:
        args.providers = [x.strip() for x in args.providers.split(",") if x.strip()]
        bad = [x for x in args.providers if x not in ALL_PROVIDERS]
        if bad:
            p.error(f"--providers: unknown {bad}; choose from {ALL_PROVIDERS}")
        args.explicit_providers = True
    else:
        args.providers = [x for x in ALL_PROVIDERS if not (x == "triton" and args.device == "cpu")]
        if args.device == "cpu":
            args.providers = [x for x in args.providers if x not in ("sdpa-cudnn", "xformers")]
        args.explicit_providers = False
    args.modes = [m for m in args.modes.split(",") if m]
    args.masks = [m for m in args.masks.split(",") if m]
    if set(args.modes) - set(MODES) or set(args.masks) - set(MASKS):
        p.error(f"--modes from {MODES}, --masks from {MASKS}")
    return args


def make_provider(name: str, device: str, t: int, mask: str):
    """-> fn(q, k, v) for one (provider, mask), or raise RuntimeError(reason) when it cannot run here."""
    prefix = t // 2 if mask == "prefix" else 0
    if name == "triton":
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("triton on CPU needs TRITON_INTERPRET=1 (set by this script when requested)")
        from svq_fast.kernels.attention import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=True, prefix_len=prefix)
    if name == "ref":
        from svq_fast.kernels.attention import attention_ref

        return lambda q, k, v: attention_ref(q, k, v, causal=True, prefix_len=prefix)
    if name == "xformers":
        from svq_fast.nn.attention import attention

        return lambda q, k, v: attention(q, k, v, causal=True, prefix_len=prefix, backend="xformers")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if backend is None:
        raise RuntimeError(f"this torch has no SDPBackend.{SDPA_BACKENDS[name]}")
    if mask == "causal":

        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return fn
    from svq_fast.nn.attention import prefix_causal_mask

    allowed = prefix_causal_mask(t, t, prefix, device)  # (T, T) bool, built once, outside the timing

    def fn_masked(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    return fn_masked


def time_ms(fn, device: str, reps: int | None) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    t_end = time.perf_counter() + 0.2  # warm-up: at least 3 calls and 0.2 s (allocator, thread pool)
    for i in range(1000):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= 2 and time.perf_counter() > t_end:
            break
    if reps is None:  # ~0.6 s of timed calls, 5..100 reps
        reps = int(min(100, max(5, 0.6 / max(dt, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def flops(b, h, t, d, mask: str, mode: str) -> float:
    p = t // 2 if mask == "prefix" else 0
    visible = (t * t + p * p) / (2 * t * t)
    fwd = 4 * b * h * t * t * d * visible
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def bench_one(fn, shape, dtype, device, mode, reps):
    b, h, t, d = shape
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(b, h, t, d, device=device, dtype=dtype)
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return fn(q, k, v)

    elif mode == "bwd":
        o = fn(q, k, v)

        def run():
            return torch.autograd.grad(o, (q, k, v), do, retain_graph=True)

    else:

        def run():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    run()  # first call: compile / autotune / raise if unsupported
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return time_ms(run, device, reps), peak


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        except Exception:  # noqa: BLE001 - informational only
            env["driver"] = None
    else:
        env["device"] = f"{cpu_name()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"
        env["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)  # other work on the box skews CPU timings
    return env


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu" and "triton" in args.providers:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before svq_fast.kernels is imported
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    env = environment(args.device)
    env.update(precision_note())
    print("".join(f"{k}: {v}\n" for k, v in env.items()), flush=True)
    jsonl = JsonlWriter(args.jsonl, "attention")
    rows = []
    for shape in args.shapes:
        for mask in args.masks:
            for mode in args.modes:
                group = []
                for name in args.providers:
                    row = {"provider": name, "B": shape[0], "H": shape[1], "T": shape[2], "d": shape[3],
                           "mask": mask, "mode": mode, "dtype": args.dtype, "device": args.device}  # fmt: skip
                    try:
                        fn = make_provider(name, args.device, shape[2], mask)
                        ms, peak = bench_one(fn, shape, dtype, args.device, mode, args.reps)
                        row.update(ms=ms, tflops=flops(*shape, mask, mode) / (ms * 1e-3) / 1e12, peak_mib=peak)
                    except (RuntimeError, ImportError, NotImplementedError, ValueError) as e:
                        row.update(ms=None, tflops=None, peak_mib=None, error=f"{type(e).__name__}: {e}"[:200])
                    finally:
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                    group.append(row)
                sdpa = [r for r in group if r["provider"].startswith("sdpa-") and r["ms"] is not None]
                best = min(sdpa, key=lambda r: r["ms"]) if sdpa else None
                for r in group:
                    r["best_sdpa"] = best["provider"] if best else None
                    r["vs_sdpa"] = best["ms"] / r["ms"] if best and r["ms"] else None
                rows.extend(group)
                for r in group:
                    jsonl.write(r)
                print_rows(group, header=not rows[: -len(group)])
    table = markdown(rows)
    if args.device == "cpu":
        env["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "argv": sys.argv[1:], "rows": rows}, indent=1))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        head = f"# bench_attention\n\n`python benchmarks/bench_attention.py {' '.join(sys.argv[1:])}`\n\n"
        envs = "".join(f"- {k}: {v}\n" for k, v in env.items())
        Path(args.md).write_text(f"{head}{envs}\n{table}\n")
    print("\n" + "".join(f"{k}: {v}\n" for k, v in env.items()))
    return rows


COLS = ("provider", "shape", "mask", "mode", "ms", "TFLOP/s", "peak MiB", "vs sdpa")


def _cells(r):
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    shape = f"{r['B']},{r['H']},{r['T']},{r['d']}"
    if r["ms"] is None:
        return [r["provider"], shape, r["mask"], r["mode"], "unsupported", "-", "-", r["error"][:60]]
    return [r["provider"], shape, r["mask"], r["mode"], f(r["ms"], ".3f"), f(r["tflops"], ".3f"),
            f(r["peak_mib"], ".0f"), f(r["vs_sdpa"], ".2f")]  # fmt: skip


def print_rows(rows, header: bool):
    if header:
        print(" | ".join(f"{c:>14}" for c in COLS))
    for r in rows:
        print(" | ".join(f"{c:>14}" for c in _cells(r)), flush=True)


def markdown(rows) -> str:
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
