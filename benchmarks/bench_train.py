"""Training throughput of each recipe through the stack (DeepSpeed engine, fused ops), plus the cost of
TensorBoard logging (logging every step on vs. off). The baseline that matters, the same architecture in plain
eager torch without fused ops or DeepSpeed, is benchmarks/bench_train_eager.py (run it in the same session;
gpu_suite.sh does). `--variants ref` swaps only the quantizer / attention backend (under 1% of a stage-1 step).
Stage 1 reports images/s, stage 2 tokens/s; mfu_measured_peak divides by the bf16 GEMM peak measured here.

    python benchmarks/bench_train.py                      # CPU: tiny configs, 1 rank
    python benchmarks/bench_train.py --device cuda --paper --seconds 60 --precision bf16   # GPU suite

Each measurement is one in-process training run (single rank, DeepSpeed engine) on the built-in synthetic data;
the first `--warmup` steps are excluded. With --repeats N the variants run interleaved N times and the summary takes
medians. TensorBoard's cost is shown two ways: throughput with logging on vs off, and the share of step time the
run itself measured inside the writer calls (time/tensorboard_fraction). --out gets JSON {runs, summary}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from svq_fast.config import apply_overrides
from svq_fast.named_configs import get_config
from svq_fast.train.stage1 import stage1_flops_per_sample, train_stage1
from svq_fast.train.stage2 import gpt_flops_per_sample, train_stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _variant_overrides(recipe: str, variant: str) -> list[str]:
    if variant == "ref":
        key = "--quantizer.backend=ref" if recipe == "stage1" else "--model.attn_backend=ref"
        return [key]
    if variant == "no_tensorboard":
        return ["--log.tensorboard=false"]
    return []


def measure(recipe: str, variant: str, args, workdir: str, stage1_export: str | None) -> dict:
    name = (
        ("svqgan_f16_256" if args.paper else "svqgan_tiny")
        if recipe == "stage1"
        else ("gpt_f16_256" if args.paper else "gpt_tiny")
    )
    cfg = get_config(name)
    out_dir = os.path.join(workdir, f"{recipe}-{variant}")
    overrides = [
        f"--data.synthetic_default={os.path.join(workdir, 'data')}",
        f"--data.synthetic_train_samples={args.samples}",
        f"--run.out_dir={out_dir}",
        f"--optim.max_steps={args.steps}",
        f"--run.max_seconds={args.seconds}",
        "--log.every=1",
        "--log.progress=false",
        f"--zero.precision={args.precision}",
        f"--optim.micro_batch={args.micro_batch}",
        "--run.keep_last=1",
    ]
    if recipe == "stage1":
        # the full GAN step; no LPIPS: the benchmark machines hold no VGG-16 weights (asking for them is an error)
        overrides += ["--loss.disc_start=0", "--loss.perceptual_weight=0"]
    else:
        overrides.append(f"--stage1={stage1_export}")
    cfg = apply_overrides(cfg, overrides + _variant_overrides(recipe, variant))
    t0 = time.perf_counter()
    result = (train_stage1 if recipe == "stage1" else train_stage2)(cfg)
    wall = time.perf_counter() - t0
    hist = result["history"][args.warmup :]
    if not hist:
        raise RuntimeError(f"{recipe}/{variant}: fewer than {args.warmup + 1} steps ran in {args.seconds}s")
    sps = sum(h["throughput/samples_per_s"] for h in hist) / len(hist)
    if recipe == "stage1":
        rate = {"images_per_s": sps, "flops_per_sample": stage1_flops_per_sample(cfg, torch.device(args.device))}
    else:
        rate = {
            "tokens_per_s": sps * 2 * cfg.model.grid**2,
            "flops_per_sample": gpt_flops_per_sample(cfg, torch.device(args.device)),
        }
    return {
        **rate,
        "recipe": recipe,
        "config": name,
        "variant": variant,
        "device": args.device,
        "precision": args.precision,
        "steps": len(hist),
        "samples_per_s": sps,
        "steps_per_s": sps / args.micro_batch,
        "mfu": sum(h.get("throughput/mfu", float("nan")) for h in hist) / len(hist),
        "peak_mem_mib": max(h["memory/peak_mib"] for h in hist),
        # measured inside the run: share of step time spent writing TensorBoard events (0 when it is off)
        "tensorboard_fraction": sum(h.get("time/tensorboard_fraction", 0.0) for h in hist) / len(hist),
        "wall_s": wall,
        "export": os.path.join(out_dir, "export"),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (recipe, variant): median samples/s over the repeats (min and max kept), its ratio to the
    recipe's fused median, and the medians of MFU and of the in-run TensorBoard fraction."""
    out = []
    for key in dict.fromkeys((r["recipe"], r["variant"]) for r in rows):
        runs = [r for r in rows if (r["recipe"], r["variant"]) == key]
        sps = [r["samples_per_s"] for r in runs]
        out.append(
            {
                "recipe": key[0],
                "variant": key[1],
                "repeats": len(runs),
                "samples_per_s": statistics.median(sps),
                "samples_per_s_min": min(sps),
                "samples_per_s_max": max(sps),
                "mfu": statistics.median(r["mfu"] for r in runs),
                "tensorboard_fraction": statistics.median(r["tensorboard_fraction"] for r in runs),
                "peak_mem_mib": max(r["peak_mem_mib"] for r in runs),
            }
        )
    for row in out:
        base = next((r for r in out if r["recipe"] == row["recipe"] and r["variant"] == "fused"), row)
        row["vs_fused"] = row["samples_per_s"] / base["samples_per_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--paper", action="store_true", help="paper-size configs (GPU)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.0, help="per-run time limit (0 = none)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--samples", type=int, default=400, help="synthetic train samples to generate")
    p.add_argument("--recipes", default="stage1,stage2")
    p.add_argument("--variants", default="fused,ref,no_tensorboard")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved; medians are reported")
    p.add_argument("--out", default="")
    p.add_argument("--jsonl", default=None, help="append each run's row to this .jsonl file as it finishes")
    p.add_argument("--smoke", action="store_true", help="tiny configs, 3 steps, CPU (CI: arguments and plumbing)")
    args = p.parse_args(argv)
    if args.smoke:
        args.paper, args.steps, args.warmup, args.seconds, args.micro_batch = False, 3, 1, 0.0, 2
        args.samples, args.precision, args.variants = 16, "fp32", "fused"
    from bench_common import JsonlWriter
    from bench_train_eager import gemm_peak_tflops

    peak = gemm_peak_tflops(args.device)  # the MFU denominator, measured here (bf16 GEMM on CUDA)
    jsonl = JsonlWriter(args.jsonl, "train")
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

    rows = []
    with tempfile.TemporaryDirectory() as work:
        stage1_export = None
        for recipe in args.recipes.split(","):
            # variants interleaved, repeat by repeat, so a slow drift of the machine hits all of them alike
            for repeat in range(args.repeats):
                for variant in args.variants.split(","):
                    row = measure(recipe, variant, args, work, stage1_export)
                    row["repeat"] = repeat
                    row["gemm_peak_tflops"] = peak
                    row["mfu_measured_peak"] = row["flops_per_sample"] * row["samples_per_s"] / (peak * 1e12)
                    rows.append(row)
                    jsonl.write({k: v for k, v in row.items() if k != "export"})
                    if recipe == "stage1" and variant == "fused" and stage1_export is None:
                        stage1_export = row["export"]
                    print(
                        f"{recipe:7s} {variant:15s} #{repeat} {row['samples_per_s']:9.2f} samples/s  "
                        f"mfu {row['mfu']:.3f}  peak {row['peak_mem_mib']:.0f} MiB",
                        flush=True,
                    )
            if recipe == "stage1" and stage1_export is None and "stage2" in args.recipes:
                raise SystemExit("stage2 needs the stage1 'fused' variant first (it exports the tokenizer)")

    summary = summarize(rows)
    cols = (("recipe", 8), ("variant", 16), ("samples/s", 10), ("min-max", 16), ("vs fused", 10), ("MFU", 8))
    head = "".join(f"{n:<{w}s}" if i < 2 else f"{n:>{w}s}" for i, (n, w) in enumerate(cols)) + f"{'peak MiB':>10s}"
    print("\n" + head)
    for row in summary:
        print(
            f"{row['recipe']:8s}{row['variant']:16s}{row['samples_per_s']:10.2f}"
            f"{row['samples_per_s_min']:8.2f}-{row['samples_per_s_max']:<7.2f}{row['vs_fused']:10.3f}"
            f"{row['mfu']:8.3f}{row['peak_mem_mib']:10.0f}"
        )
    for recipe in dict.fromkeys(r["recipe"] for r in summary):
        by = {r["variant"]: r for r in summary if r["recipe"] == recipe}
        if "ref" in by and "fused" in by:
            print(f"{recipe}: fused is {by['fused']['samples_per_s'] / by['ref']['samples_per_s']:.2f}x backend=ref")
        if "no_tensorboard" in by and "fused" in by:
            overhead = 1 - by["fused"]["samples_per_s"] / by["no_tensorboard"]["samples_per_s"]
            print(
                f"{recipe}: TensorBoard logging every step: {100 * overhead:.1f}% of throughput (medians, logging on "
                f"vs off); {100 * by['fused']['tensorboard_fraction']:.2f}% of step time inside the writer calls"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
