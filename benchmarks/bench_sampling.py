"""Benchmark image-token sampling: full recomputation vs the dynamic / static KV cache (and a CUDA graph).

    python benchmarks/bench_sampling.py                                  # CPU, fp32, batch 1 and 4
    python benchmarks/bench_sampling.py --device cuda --out r.json      # GPU, bf16, batch 1, 8, 32
    python benchmarks/bench_sampling.py --batches 1 --full-tokens 256   # time full recomputation on all 256

Model: the issue's 12-layer, width-512 GPT (8 heads, image vocab 16384, semantic vocab 4096, 16x16 grid:
256 semantic tokens, then 256 image tokens), random weights (timing does not depend on them), eval mode,
temperature 1, no top-k/top-p, no guidance. Every timed run is one call of
svq_fast.eval.sampling.sample_image_tokens, prefill included (and, for cuda-graph, the graph capture too).

Modes: full (use_cache=False: the whole sequence is recomputed for every token), dynamic, static,
cuda-graph (static cache + CUDA-graph decode step, CUDA only).
tokens/s = batch * tokens / seconds (image tokens over all sequences of the batch).

Full recomputation costs O(T^2) per sample, so on CPU it is timed on the first --full-tokens image tokens
(default 64) and the cached modes are timed on the same first K tokens for the speedup (`speedup` =
t_full(K) / t_mode(K), both measured in this run) and on all 256 tokens for the tokens/s. Over the first K
tokens the cached path also pays the whole prefill while the recomputation is at its cheapest, so the
speedup over a complete 256-token sample is larger than the printed one (nothing is extrapolated).

Sliding windows (--window-grids, default 1x2,2x2): maps larger than the GPT's grid, R x C windows' worth of latents
(16R x 16C), sampled by svq_fast.eval.sliding_window: mode "window" (each window's KV cache caught up with its
neighbours' tokens) on all 256RC tokens, and on the first --full-tokens tokens beside "window-full" (taming's
recomputation of every token's window sequence) for its speedup. `positions` = sequence positions the cached
windows run through the GPT (window_cost), against 511 for one 16x16 sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from device_info import cpu_name  # benchmarks/device_info.py (the script folder is on sys.path)

from svq_fast.config import GPTConfig
from svq_fast.eval.sampling import sample_image_tokens
from svq_fast.eval.sliding_window import sample_image_tokens_window, window_cost
from svq_fast.models.gpt import SemanticGPT

MODES = ("full", "dynamic", "static", "cuda-graph")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--batches", default=None, help="comma list (default: 1,4 on cpu; 1,8,32 on cuda)")
    p.add_argument("--modes", default=None, help=f"comma list from {MODES} (default: all usable)")
    p.add_argument(
        "--full-tokens",
        type=int,
        default=None,
        help="image tokens timed for full recomputation and the speedup (default: 64 cpu, 256 cuda)",
    )
    p.add_argument("--reps", type=int, default=1, help="timed repetitions per row (the median is reported)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads on CPU (default 1: on a shared, oversubscribed box 2 threads "
        "made timings erratic, see results/attention_cpu.md)",
    )
    p.add_argument(
        "--window-grids",
        default="1x2,2x2",
        help="comma list of RxC grids of windows for the sliding-window rows ('' = none)",
    )
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--paper", action="store_true", help="the paper-size GPT (gpt_f16_256's model; overrides --layers, "
                   "--width, --heads)")  # fmt: skip
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off; CFG runs the "
                   "conditional and unconditional sequences together, 2B)")  # fmt: skip
    p.add_argument("--jsonl", default=None, help="append each row to this .jsonl file as it is measured (gpu_suite.sh)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--md", default=None, help="also write the table as markdown here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.batches = [int(x) for x in (args.batches or ("1,8,32" if args.device == "cuda" else "1,4")).split(",")]
    if args.modes:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in args.modes if m not in MODES]
        if bad:
            p.error(f"--modes: unknown {bad}; choose from {MODES}")
    else:
        args.modes = [m for m in MODES if m != "cuda-graph" or args.device == "cuda"]
    if "cuda-graph" in args.modes and args.device != "cuda":
        p.error("--modes cuda-graph needs --device cuda")
    if args.full_tokens is None:
        args.full_tokens = 256 if args.device == "cuda" else 64
    if not 1 <= args.full_tokens <= 256:
        p.error("--full-tokens must be in [1, 256]")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    try:
        args.window_grids = [tuple(int(v) for v in x.split("x")) for x in args.window_grids.split(",") if x.strip()]
    except ValueError:
        p.error(f"--window-grids: expected a comma list like 1x2,2x2, got {args.window_grids!r}")
    if any(len(rc) != 2 or min(rc) < 1 for rc in args.window_grids):
        p.error(f"--window-grids: each entry is RxC with R, C >= 1, got {args.window_grids}")
    return args


def machine(args) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    if args.device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = "not installed"
    else:
        info["device"] = f"{cpu_name()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"
    return info


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sampling(gpt, sem, mode: str, n: int, reps: int, guidance: float = 1.0) -> float:
    kw = {
        "full": dict(use_cache=False),
        "dynamic": dict(cache="dynamic"),
        "static": dict(cache="static"),
        "cuda-graph": dict(cuda_graph=True),
    }[mode]
    times = []
    for r in range(reps):
        gen = torch.Generator(sem.device).manual_seed(r)
        sync(sem.device)
        t0 = time.perf_counter()
        sample_image_tokens(gpt, sem, generator=gen, num_tokens=n, guidance_scale=guidance, **kw)
        sync(sem.device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def time_window(gpt, sem, shape, n: int, reps: int, use_cache: bool, guidance: float = 1.0) -> float:
    """Median seconds of one sliding-window sampling call over the first n tokens of a shape = (h, w) grid."""
    times = []
    for r in range(reps):
        gen = torch.Generator(sem.device).manual_seed(r)
        sync(sem.device)
        t0 = time.perf_counter()
        sample_image_tokens_window(
            gpt, sem, shape, generator=gen, num_tokens=n, use_cache=use_cache, guidance_scale=guidance
        )
        sync(sem.device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def window_rows(args, gpt, cfg, device, info) -> list[dict]:
    """The sliding-window rows: per batch and R x C grid of windows, cached on all tokens and on the first K
    (beside per-token recomputation on the first K, for the speedup)."""
    rows = []
    k = args.full_tokens
    for b in args.batches:
        for r, c in args.window_grids:
            shape = (r * cfg.grid, c * cfg.grid)
            sem = torch.randint(0, cfg.semantic_vocab, (b, shape[0] * shape[1]), device=device)
            sample_image_tokens_window(gpt, sem, shape, num_tokens=3)  # warm-up
            cost = window_cost(*shape, cfg.grid)
            t_k = {}
            for mode, n in (("window-full", k), ("window", k), ("window", shape[0] * shape[1])):
                load0 = loadavg()
                t = time_window(gpt, sem, shape, n, args.reps, use_cache=mode == "window", guidance=args.guidance)
                if n == k:
                    t_k[mode] = t
                rows.append(
                    dict(
                        device=info["device"],
                        dtype=args.dtype,
                        batch=b,
                        mode=f"{mode} {r}x{c}",
                        tokens=n,
                        seconds=round(t, 4),
                        tokens_per_s=round(b * n / t, 2),
                        positions=cost["positions"] if mode == "window" else cost["recompute_positions"],
                        load_start=load0,
                        load_end=loadavg(),
                    )
                )
                print(f"batch {b:3d} {mode} {r}x{c} {n:4d} tokens  {t:9.3f} s  {b * n / t:10.1f} tokens/s", flush=True)
            s = t_k["window-full"] / t_k["window"]
            rows[-2]["speedup_vs_full"] = round(s, 2)
            print(f"batch {b:3d} window {r}x{c} speedup {s:.1f} (vs per-token recomputation, first {k} tokens each)")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = GPTConfig(
        image_vocab=16384,
        semantic_vocab=4096,
        grid=16,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.width,
        cfg_dropout=0.0,
        attn_backend="auto",
    )
    if args.paper:
        import dataclasses

        from svq_fast.named_configs import get_config

        cfg = dataclasses.replace(get_config("gpt_f16_256").model, cfg_dropout=0.0, attn_backend="auto")
        args.layers, args.width, args.heads = cfg.n_layer, cfg.n_embd, cfg.n_head
    gpt = SemanticGPT(cfg).to(device=device, dtype=DTYPES[args.dtype]).eval().requires_grad_(False)
    info = machine(args)
    k = args.full_tokens
    print(f"# bench_sampling: {info['device']}, torch {info['torch']}, {args.dtype}, guidance {args.guidance}")
    print(
        f"# GPT {args.layers} layers, width {args.width}, {args.heads} heads, V_img 16384, V_sem 4096, "
        f"256 semantic + 256 image tokens; full recomputation timed on the first {k} image tokens"
    )
    rows = []
    for b in args.batches:
        sem = torch.randint(0, cfg.semantic_vocab, (b, gpt.n_sem), device=device)
        for mode in args.modes:  # warm-up: kernels, allocator, triton compile, graph path
            if mode != "full" or device.type == "cuda":
                sample_image_tokens(
                    gpt,
                    sem,
                    num_tokens=3,
                    use_cache=mode != "full",
                    cache="dynamic" if mode == "dynamic" else "static",
                    cuda_graph=mode == "cuda-graph",
                    guidance_scale=args.guidance,
                )
        t_k = {}
        for mode in args.modes:
            lengths = [k] if mode == "full" else sorted({k, 256})
            for n in lengths:
                load0 = loadavg()
                t = time_sampling(gpt, sem, mode, n, args.reps, args.guidance)
                if n == k:
                    t_k[mode] = t
                row = dict(
                    device=info["device"],
                    dtype=args.dtype,
                    batch=b,
                    mode=mode,
                    tokens=n,
                    seconds=round(t, 4),
                    tokens_per_s=round(b * n / t, 2),
                    load_start=load0,
                    load_end=loadavg(),
                )
                if n == gpt.n_img:  # a whole sample: image tokens only (the decoder's pass is not timed)
                    row.update(images_per_s=round(b / t, 3), guidance=args.guidance, layers=args.layers,
                               width=args.width)  # fmt: skip
                rows.append(row)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps({"bench": "sampling", **row}) + "\n")
                print(f"batch {b:3d} {mode:10s} {n:3d} tokens  {t:9.3f} s  {b * n / t:10.1f} tokens/s", flush=True)
        if "full" in t_k:
            for mode in [m for m in args.modes if m != "full"]:
                s = t_k["full"] / t_k[mode]
                for row in rows:
                    if row["batch"] == b and row["mode"] == mode and row["tokens"] == k:
                        row["speedup_vs_full"] = round(s, 2)
                print(f"batch {b:3d} {mode:10s} speedup {s:.1f} (vs full recomputation, first {k} tokens each)")
    if args.window_grids:
        rows += window_rows(args, gpt, cfg, device, info)
    result = dict(bench="sampling", args=vars(args), info=info, rows=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.md:
        lines = [
            "| batch | mode | image tokens | s | tokens/s | speedup vs full (same K) | load 1m start/end "
            "| GPT positions |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            sp = f"{r['speedup_vs_full']:.1f}" if "speedup_vs_full" in r else "-"
            lines.append(
                f"| {r['batch']} | {r['mode']} | {r['tokens']} | {r['seconds']:.3f} | "
                f"{r['tokens_per_s']:.1f} | {sp} | {r['load_start']} / {r['load_end']} | {r.get('positions', '-')} |"
            )
        Path(args.md).write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
