"""Benchmark the two fused ops that have no benchmark of their own on the GPU: the one-hot-free semantic input conv
and the chunked linear + cross-entropy, each against its unfused torch baseline in the same run.

    python benchmarks/bench_ops.py --device cuda --dtype bf16 --jsonl out/rows.jsonl
    python benchmarks/bench_ops.py --smoke                      # tiny sizes on CPU (CI: arguments and plumbing)

Rows (fwd+bwd, median ms, peak MiB on CUDA, `vs_base` = t_baseline / t: > 1 is faster):
  semantic_conv: triton (svq_fast.kernels.semantic_conv, backend="triton") vs ref (one-hot (B, C, H, W) + F.conv2d
      through cuDNN). Shape: B x H x W labels, C classes, Cout channels, 3x3.
  cross_entropy: triton (chunked, Triton softmax/grad kernel), torch (same chunking, torch ops) vs ref (full
      (N, V) logits + F.cross_entropy). Shape: N tokens x C width -> V vocabulary.
Timing: bench_common.time_ms (triton.testing.do_bench on CUDA).
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_common import JsonlWriter, peak_mib, precision_note, time_ms  # benchmarks/bench_common.py

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--ops", default="semantic_conv,cross_entropy")
    p.add_argument("--sc-shape", default="8x256x256x243x128", help="BxHxWxCxCout")
    p.add_argument("--ce-shape", default="16384x1024x16384", help="NxCxV")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU CI): checks the plumbing, not speed")
    p.add_argument("--budget-s", type=float, default=1.0)
    p.add_argument("--jsonl", default=None, help="append each row to this .jsonl file as it is measured")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.smoke:
        args.sc_shape, args.ce_shape, args.budget_s = "1x16x16x7x16", "64x32x100", 0.05
    args.ops = [x for x in args.ops.split(",") if x]
    return args


def _sc_providers(device: str):
    from svq_fast.kernels.semantic_conv import semantic_conv, semantic_conv_ref

    out = {"ref": lambda lab, w, b: semantic_conv_ref(lab, w, b)}
    if device == "cuda":
        out["triton"] = lambda lab, w, b: semantic_conv(lab, w, b, backend="triton")
    return out


def _ce_providers(device: str):
    from svq_fast.kernels.cross_entropy import chunked_cross_entropy, chunked_cross_entropy_ref

    out = {
        "ref": lambda h, w, t: chunked_cross_entropy_ref(h, w, t),
        "torch": lambda h, w, t: chunked_cross_entropy(h, w, t, backend="torch"),
    }
    if device == "cuda":
        out["triton"] = lambda h, w, t: chunked_cross_entropy(h, w, t, backend="triton")
    return out


def bench_semantic_conv(args, dtype, jsonl) -> list[dict]:
    b, h, w, c, cout = (int(x) for x in args.sc_shape.split("x"))
    dev = args.device
    labels = torch.randint(0, c, (b, h, w), device=dev)  # (B, H, W)
    weight = (torch.randn(cout, c, 3, 3, device=dev) * 0.05).to(dtype).requires_grad_()  # (Cout, C, 3, 3)
    bias = torch.zeros(cout, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(b, cout, h, w, device=dev, dtype=dtype)  # (B, Cout, H, W) upstream gradient
    rows = []
    for name, fn in _sc_providers(dev).items():

        def step(fn=fn):
            weight.grad = bias.grad = None
            fn(labels, weight, bias).backward(g)

        ms, reps = time_ms(step, dev, budget_s=args.budget_s)
        row = dict(op="semantic_conv", provider=name, dtype=args.dtype, mode="fwd+bwd", shape=args.sc_shape,
                   ms=ms, peak_mib=peak_mib(step, dev), reps=reps)  # fmt: skip
        rows.append(row)
    return _ratios(rows, jsonl)


def bench_cross_entropy(args, dtype, jsonl) -> list[dict]:
    n, c, v = (int(x) for x in args.ce_shape.split("x"))
    dev = args.device
    hidden = torch.randn(n, c, device=dev, dtype=dtype, requires_grad=True)  # (N, C)
    weight = (torch.randn(v, c, device=dev) * c**-0.5).to(dtype).requires_grad_()  # (V, C)
    target = torch.randint(0, v, (n,), device=dev)  # (N,)
    rows = []
    for name, fn in _ce_providers(dev).items():

        def step(fn=fn):
            hidden.grad = weight.grad = None
            fn(hidden, weight, target).backward()

        ms, reps = time_ms(step, dev, budget_s=args.budget_s)
        row = dict(op="cross_entropy", provider=name, dtype=args.dtype, mode="fwd+bwd", shape=args.ce_shape,
                   ms=ms, peak_mib=peak_mib(step, dev), reps=reps)  # fmt: skip
        rows.append(row)
    return _ratios(rows, jsonl)


def _ratios(rows: list[dict], jsonl) -> list[dict]:
    base = next(r for r in rows if r["provider"] == "ref")
    for r in rows:
        r["baseline"] = "ref"
        r["vs_base"] = base["ms"] / r["ms"]
        jsonl.write(r)
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"{r['op']:14s} {r['provider']:7s} {r['dtype']} {r['shape']:18s} {r['ms']:9.3f} ms  "
              f"peak {peak:>6s} MiB  {r['vs_base']:6.2f}x ref", flush=True)  # fmt: skip
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"bench_ops on {args.device}, {args.dtype}, {precision_note()}", flush=True)
    jsonl = JsonlWriter(args.jsonl, "ops")
    dtype = DTYPES[args.dtype]
    for op in args.ops:
        {"semantic_conv": bench_semantic_conv, "cross_entropy": bench_cross_entropy}[op](args, dtype, jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
