"""Benchmark nearest-codebook VQ (distance + argmin + losses + straight-through, and its backward).

    python benchmarks/bench_vq.py                               # CPU, fp32, the issue shapes, < 3 minutes
    python benchmarks/bench_vq.py --device cuda --dtype bf16    # GPU (adds the triton provider)
    python benchmarks/bench_vq.py --shapes 8192x16384x256 --providers native,ref --modes forward+backward \\
        --out results.json

Providers (same as tests/kernels/test_vq.py, plus two baselines):
  triton  svq_fast.kernels.vq.vq(backend="triton")  (CUDA only: the CPU interpreter is not a performance path)
  native  svq_fast.kernels.vq.vq(backend="native")  (the C++/OpenMP op; CPU only)
  ref     svq_fast.kernels.vq.vq_ref: the textbook torch version that builds the (N, K) distance matrix
  vqp     vector_quantize_pytorch.VectorQuantize(dim, codebook_size, commitment_weight=0.25,
          learnable_codebook=True, ema_update=False, rotation_trick=False) in training mode: the same
          computation (nearest code, straight-through, gradient to input and codebook) as a popular library does it
  gemm    only the (N, D) @ (D, K) product z @ e.T into a preallocated (N, K) output (allocation and page
          faults excluded, so its peak memory reads 0): the FLOP floor of any exact VQ forward (timed in forward
          and forward+backward mode; the VQ backward itself needs no GEMM)
Modes: forward, backward (the forward runs untimed first), forward+backward.
Backward feeds gradients to z_q (a fixed random (N, D)) and 1 to each loss, i.e. d/dz and d/dcodebook.

Layout: by default all providers run in one process and, after each provider's warm-up, their timed runs
alternate (provider A rep 1, B rep 1, ..., A rep 2, ...), so the load of a shared machine hits them alike;
--isolate runs each provider in its own fresh process instead, one after the other.
Time: median of `--reps` wall-clock runs after one warm-up run (fewer reps when one run exceeds --budget-s).
Peak memory, `peak_mem_mib`: on CUDA, torch.cuda.max_memory_allocated() minus the allocated bytes before the
call. On CPU, the peak of the bytes held by torch's CPU allocator that were allocated during the call, from the
allocation events of torch.profiler(profile_memory=True) in the warm-up run; inputs (z, codebook, upstream
gradient) exist before and are excluded, gradients written during the call are included. Not counted for any
provider: memory that bypasses torch's allocator (MKL's internal GEMM packing buffers, Python objects). The native
op allocates its per-thread scratch through torch's allocator on the calling thread, so it is counted.
Ratios in the printed table: time_vs_ref = t / t_ref, mem_vs_ref = peak / peak_ref, time_vs_gemm = t / t_gemm,
for the same shape and mode in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from bench_common import JsonlWriter, peak_mib, precision_note, time_ms  # benchmarks/bench_common.py
from device_info import cpu_name  # benchmarks/device_info.py (the script folder is on sys.path)
from memory import cpu_alloc_peak_mib  # benchmarks/memory.py (the script folder is on sys.path)

PROVIDERS = ("triton", "native", "ref", "vqp", "gemm")
MODES = ("forward", "backward", "forward+backward")
SHAPES = ((8192, 16384, 256), (8192, 4096, 256), (8192, 16384, 8), (2048, 16384, 256))
CUDA_EXTRA_SHAPES = ((65536, 16384, 256), (65536, 1024, 64))  # a batch of 16 latent maps 64x64 (N >= 65536)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BETA = 0.25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", help=f"comma list from {list(DTYPES)}, e.g. bf16,fp32")
    p.add_argument("--shapes", default=None, help="NxKxD[,NxKxD...] (default: the issue shapes; cuda adds N=65536)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list from {MODES}")
    p.add_argument("--reps", type=int, default=3, help="timed runs per row (after one warm-up)")
    p.add_argument("--budget-s", type=float, default=1.5, help="cap on timed seconds per row (at least 1 run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--isolate", action="store_true",
                   help="one fresh process per provider, one after the other (default: one process whose "
                        "providers' timed runs alternate: fairer ratios on a shared, noisy machine)")  # fmt: skip
    p.add_argument("--md", default=None, help="also write the table as markdown here")
    p.add_argument("--out", default=None, help="write the rows as a JSON list here")
    p.add_argument("--jsonl", default=None, help="append each row to this .jsonl file as it is measured")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one provider, print JSON
    args = p.parse_args(argv)
    args.dtypes = [x for x in args.dtype.split(",") if x]
    if not args.dtypes or any(x not in DTYPES for x in args.dtypes):
        p.error(f"--dtype takes a comma list from {list(DTYPES)}, got {args.dtype!r}")
    args.dtype = args.dtypes[0]
    if args.shapes is None:
        shapes = (*CUDA_EXTRA_SHAPES, *SHAPES) if args.device == "cuda" else SHAPES
        args.shapes = ",".join("x".join(map(str, s)) for s in shapes)
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    args.providers = [s for s in args.providers.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    for name, got, allowed in (("provider", args.providers, PROVIDERS), ("mode", args.modes, MODES)):
        bad = [g for g in got if g not in allowed]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {allowed}")
    if any(len(s) != 3 for s in args.shapes):
        p.error("--shapes takes NxKxD triples, e.g. 8192x16384x256")
    return args


# -- one provider (runs inside a worker process) -----------------------------------------------------------------


def _unavailable(provider: str, device: str, dtype: torch.dtype) -> str | None:
    if provider == "triton" and device != "cuda":
        return "triton runs on CUDA only here (the CPU interpreter is a correctness path, not a performance path)"
    if provider == "native":
        from svq_fast._ext import native_available, native_error

        if device != "cpu":
            return "the native op is CPU-only"
        if not native_available():
            return f"native extension not built ({native_error()})"
    if provider == "vqp":
        try:
            import vector_quantize_pytorch  # noqa: F401
        except ImportError as e:
            return f"vector_quantize_pytorch not importable ({e}); `pip install vector-quantize-pytorch`"
    return None


def _make_step(provider: str, z, e, g):
    """-> (forward() -> outputs, backward(outputs)) for one provider; outputs feed backward."""
    one = torch.ones((), device=z.device)
    if provider in ("triton", "native"):
        from svq_fast.kernels.vq import vq

        def fwd():
            return vq(z, e, BETA, backend=provider)

        def bwd(out):
            torch.autograd.backward([out.z_q, out.loss_codebook, out.loss_commit], [g, one, one])

        return fwd, bwd
    if provider == "ref":
        from svq_fast.kernels.vq import vq_ref

        def fwd():
            return vq_ref(z, e, BETA)

        def bwd(out):
            torch.autograd.backward([out.z_q, out.loss_codebook, out.loss_commit], [g, one, one])

        return fwd, bwd
    if provider == "vqp":
        from vector_quantize_pytorch import VectorQuantize

        n, d = z.shape
        k = e.shape[0]
        m = VectorQuantize(dim=d, codebook_size=k, commitment_weight=BETA, learnable_codebook=True, ema_update=False,
                           rotation_trick=False).to(device=z.device, dtype=z.dtype)  # fmt: skip
        m.train()
        with torch.no_grad():
            m._codebook.embed.copy_(e.detach().view_as(m._codebook.embed))
        x = z.detach().view(1, n, d).requires_grad_()

        def fwd():
            return m(x)  # (quantized (1, N, D), indices (1, N), loss ())

        def bwd(out):
            torch.autograd.backward([out[0], out[2]], [g.view(1, n, d), torch.ones_like(out[2])])

        return fwd, bwd
    if provider == "gemm":
        zd, ed = z.detach(), e.detach()
        out = torch.empty(zd.shape[0], ed.shape[0], device=z.device, dtype=z.dtype)  # (N, K), allocated untimed

        def fwd():
            return torch.mm(zd, ed.t(), out=out)  # (N, K)

        return fwd, None
    raise ValueError(provider)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _measure(prepare, call, device, reps, budget_s):
    """state = prepare() untimed, then call(state) measured: one warm-up run measured for peak memory, then up
    to `reps` timed runs (fewer when over budget)."""
    if device == "cuda":
        state = prepare()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        call(state)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        state = prepare()
        t0 = time.perf_counter()
        peak = cpu_alloc_peak_mib(functools.partial(call, state))
        first = time.perf_counter() - t0
    state = None
    if reps == 0:
        return first * 1e3, peak, 0
    n = max(1, min(reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        state = prepare()
        _sync(device)
        t0 = time.perf_counter()
        call(state)
        _sync(device)
        times.append(time.perf_counter() - t0)
        state = None
    return statistics.median(times) * 1e3, peak, n


def run_worker(args) -> list[dict]:
    provider = args.worker
    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    why = _unavailable(provider, device, dtype)
    if why:
        return [{"provider": provider, "skipped": why}]
    rows = []
    for n, k, d in args.shapes:
        rows.extend(_bench_shape(provider, n, k, d, args))
    return rows


def _inputs(n: int, k: int, d: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()  # (N, D)
    e = torch.randn(k, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()  # (K, D)
    g = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)  # (N, D) upstream gradient of z_q
    return z, e, g


def _mode_fns(fwd, bwd, z, e, mode):
    """(prepare() -> state, call(state)) for one mode; prepare is not measured."""

    def prepare():
        z.grad = e.grad = None
        return fwd() if mode == "backward" else None  # backward mode: the forward is not measured

    def call(state):
        if mode == "backward":
            bwd(state)
            return
        out = fwd()
        if mode == "forward+backward" and bwd is not None:
            bwd(out)

    return prepare, call


def _row(provider, n, k, d, args, mode, ms, peak, reps):
    peak = peak or 0.0
    print(f"  {provider:7s} {args.dtype} {n}x{k}x{d} {mode:17s} {ms:10.3f} ms  {peak:9.1f} MiB  ({reps} reps)",
          file=sys.stderr, flush=True)  # fmt: skip
    row = dict(provider=provider, device=args.device, N=n, K=k, D=d, dtype=args.dtype, mode=mode,
               ms_median=round(ms, 4), peak_mem_mib=round(peak, 1), reps=reps)  # fmt: skip
    JsonlWriter(args.jsonl, "vq").write(row)
    return row


def _bench_shape(provider: str, n: int, k: int, d: int, args) -> list[dict]:
    z, e, g = _inputs(n, k, d, args.device, DTYPES[args.dtype])
    fwd, bwd = _make_step(provider, z, e, g)
    rows = []
    for mode in args.modes:
        if provider == "gemm" and mode == "backward":
            continue
        prepare, call = _mode_fns(fwd, bwd, z, e, mode)
        ms, peak, reps = _measure(prepare, call, args.device, args.reps, args.budget_s)
        rows.append(_row(provider, n, k, d, args, mode, ms, peak, reps))
    return rows


def _once(prepare, call):
    call(prepare())


def run_interleaved(args) -> list[dict]:
    """All providers in this process; after each provider's warm-up (peak memory), the timed reps alternate
    between providers so that a shared machine's load hits them alike."""
    device = args.device
    rows = []
    providers = []
    for p in args.providers:
        why = _unavailable(p, device, DTYPES[args.dtype])
        if why:
            rows.append({"provider": p, "skipped": why})
        else:
            providers.append(p)
    for n, k, d in args.shapes:
        z, e, g = _inputs(n, k, d, device, DTYPES[args.dtype])
        steps = {p: _make_step(p, z, e, g) for p in providers}
        for mode in args.modes:
            fns = {p: _mode_fns(*steps[p], z, e, mode) for p in providers if not (p == "gemm" and mode == "backward")}
            if device == "cuda":  # CUDA events per call (do_bench when nothing needs untimed set-up)
                for p, (prepare, call) in fns.items():
                    once = functools.partial(_once, prepare, call)
                    peak = peak_mib(once, device)
                    if mode == "backward":
                        ms, n_reps = time_ms(call, device, prepare=prepare, budget_s=args.budget_s)
                    else:
                        ms, n_reps = time_ms(once, device, budget_s=args.budget_s)
                    rows.append(_row(p, n, k, d, args, mode, ms, peak, n_reps))
                continue
            peaks, times, reps = {}, {p: [] for p in fns}, {}
            for p, (prepare, call) in fns.items():
                first_ms, peaks[p], _ = _measure(prepare, call, device, 0, 0.0)  # warm-up + memory only
                reps[p] = max(1, min(args.reps, int(args.budget_s * 1e3 / max(first_ms, 1e-3))))
            for r in range(args.reps):
                for p, (prepare, call) in fns.items():
                    if r >= reps[p]:
                        continue
                    state = prepare()
                    _sync(device)
                    t0 = time.perf_counter()
                    call(state)
                    _sync(device)
                    times[p].append(time.perf_counter() - t0)
                    state = None
            for p in fns:
                rows.append(_row(p, n, k, d, args, mode, statistics.median(times[p]) * 1e3, peaks[p], reps[p]))
    return rows


# -- driver: one fresh process per provider ----------------------------------------------------------------------


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def table_lines(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "skipped" not in r]
    base = {(r["N"], r["K"], r["D"], r["mode"], r["provider"], r["dtype"]): r for r in ok}
    head = f"{'provider':13s} {'N':>6s} {'K':>6s} {'D':>4s} {'mode':17s} {'ms':>9s} {'peak MiB':>9s} "
    head += f"{'time/ref':>8s} {'mem/ref':>8s} {'time/gemm':>9s} {'reps':>4s}"
    lines = [head, "-" * len(head)]
    order = lambda r: (r["dtype"], r["N"], r["K"], r["D"], MODES.index(r["mode"]), PROVIDERS.index(r["provider"]))  # noqa: E731
    for r in sorted(ok, key=order):
        key = (r["N"], r["K"], r["D"], r["mode"])
        ref, gemm = base.get((*key, "ref", r["dtype"])), base.get((*key, "gemm", r["dtype"]))
        tr = f"{r['ms_median'] / ref['ms_median']:.2f}" if ref else "-"
        mr = f"{r['peak_mem_mib'] / ref['peak_mem_mib']:.3f}" if ref and ref["peak_mem_mib"] > 0 else "-"
        tg = f"{r['ms_median'] / gemm['ms_median']:.2f}" if gemm else "-"
        lines.append(f"{r['provider'] + ' ' + r['dtype']:13s} {r['N']:6d} {r['K']:6d} {r['D']:4d} {r['mode']:17s} "
                     f"{r['ms_median']:9.3f} "
                     f"{r['peak_mem_mib']:9.1f} {tr:>8s} {mr:>8s} {tg:>9s} {r['reps']:4d}")  # fmt: skip
    for r in rows:
        if "skipped" in r:
            lines.append(f"note: provider {r['provider']} skipped: {r['skipped']}")
    return lines


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


def _run_isolated(args) -> list[dict]:
    rows = []
    passthrough = ["--device", args.device, "--dtype", args.dtype, "--reps", str(args.reps), "--budget-s",
                   str(args.budget_s), "--threads", str(args.threads), "--modes", ",".join(args.modes),
                   "--shapes", ",".join("x".join(map(str, s)) for s in args.shapes)]  # fmt: skip
    for provider in args.providers:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, *passthrough]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if res.returncode != 0:
            rows.append({"provider": provider, "skipped": f"worker failed with exit code {res.returncode}"})
            continue
        rows.extend(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), _loadavg()
    layout = "isolated processes" if args.isolate else "one process, interleaved"
    header = f"bench_vq on {_machine(args.device)}, dtypes {','.join(args.dtypes)}, {layout}, "
    header += f"loadavg(1m) at start {load_start}, matmul precision {precision_note()}"
    print(f"# {header}", flush=True)
    rows = []
    for dt in args.dtypes:
        args.dtype = dt
        rows += _run_isolated(args) if args.isolate else run_interleaved(args)
    lines = table_lines(rows)
    footer = f"total {time.perf_counter() - t_start:.0f} s, loadavg(1m) at end {_loadavg()}"
    print("\n".join(lines))
    print(f"# {footer}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([r for r in rows if "skipped" not in r], f, indent=1)
    if args.md:
        cmd = "python benchmarks/bench_vq.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.md, "w") as f:
            f.write(f"# bench_vq\n\n`{cmd.strip()}`\n\n{header}\n\n```\n" + "\n".join(lines) + f"\n```\n\n{footer}\n")


if __name__ == "__main__":
    main()
