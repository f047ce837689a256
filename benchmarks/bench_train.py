"""Training throughput of each recipe through the stack (DeepSpeed engine, fused ops), plus the cost of
TensorBoard logging (logging every step on vs. off). The baseline that matters, the same architecture in plain
eager torch without fused ops or DeepSpeed, is benchmarks/bench_train_eager.py (run it in the same session;
gpu_suite.sh does). `--variants ref` swaps only the quantizer / attention backend (under 1% of a stage-1 step).
Stage 1 reports images/s, stage 2 tokens/s; mfu divides by the datasheet peak its row names (mfu_peak,
svq_fast.train.perf), mfu_measured_peak by a GEMM in the run's precision measured here (bench_common.mfu_fields).

    python benchmarks/bench_train.py                      # CPU: tiny configs, 1 rank
    python benchmarks/bench_train.py --device cuda --paper --seconds 60 --precision bf16   # GPU suite

Each measurement is one in-process training run (single rank, DeepSpeed engine) on the built-in synthetic data, at
the config's own log cadence (log.every, 10; --log-every to change it): the timed window runs from the first log step
at or past `--warmup` to the last log step the run reaches (the device synchronised there, once per log window, as the
loop's own logging does), so compiles stay outside it and no step is synchronised more than in a real run. A run ends
at --steps or --seconds, whichever comes first; stage 2 trains on the export of the stage-1 'fused' row (its run must
have exported). With --repeats N the variants run interleaved N times and the summary takes medians. TensorBoard's
cost is shown two ways: throughput with logging on vs off, and the share of step time the
run itself measured inside the writer calls (time/tensorboard_fraction). --out gets JSON {runs, summary}.

The step's speed table (issue 20), every row a fresh process (so peak RSS, compile time and the random stream are each
run's own) launched on --ranks CPU ranks, variants interleaved repeat by repeat, ratios to eager fp32:

    flock /tmp/svq_timing.lock python benchmarks/bench_train.py --table --ranks 2 --repeats 2
    flock /tmp/svq_timing.lock python benchmarks/bench_train.py --table --ranks 2 --repeats 2 --mid   # mid size

    eager_fp32     the issue's baseline (DeepSpeed engine, fused ops, fp32, default memory format)
    compiled_fp32  --run.compile=true (inductor; fullgraph)
    eager_bf16     --zero.precision=bf16 (torch autocast over fp32 weights; VQ search and losses fp32)
    compiled_bf16  both
    channels_last  --model.channels_last=true (stage 1 only: the conv nets; the tiny sVQGAN's default since)
    compiled_channels_last  compile and channels-last (stage 1 only)
    plain_fp32     benchmarks/bench_train_eager.py: the same architecture in plain eager torch, no fused ops, no
                   DeepSpeed, one process (its threads = the ranks' cores)
Columns: samples/s (median, min-max), ratio to eager_fp32, peak RSS (MiB, rank 0), compile time (the first steps'
time over the steady step time: 0 for eager; repeat 0 compiles cold, later repeats hit inductor's on-disk cache).
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
from bench_common import bench_config, gemm_peak_tflops, mfu_fields  # benchmarks/bench_common.py

from svq_fast.config import apply_overrides
from svq_fast.dist import deepspeed_command
from svq_fast.train.stage1 import stage1_flops_per_sample, train_stage1
from svq_fast.train.stage2 import gpt_flops_per_sample, train_stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TABLE_VARIANTS = "eager_fp32,compiled_fp32,eager_bf16,compiled_bf16,channels_last,compiled_channels_last,plain_fp32"
_OPTIONS = {
    "eager_fp32": ["--zero.precision=fp32"],
    "compiled_fp32": ["--zero.precision=fp32", "--run.compile=true"],
    "eager_bf16": ["--zero.precision=bf16"],
    "compiled_bf16": ["--zero.precision=bf16", "--run.compile=true"],
    "channels_last": ["--zero.precision=fp32"],
    "compiled_channels_last": ["--zero.precision=fp32", "--run.compile=true"],
}
CHANNELS_LAST_VARIANTS = ("channels_last", "compiled_channels_last")  # stage 1 only: the GPT has no convolutions


def _variant_overrides(recipe: str, variant: str) -> list[str]:
    if variant == "ref":
        key = "--quantizer.backend=ref" if recipe == "stage1" else "--model.attn_backend=ref"
        return [key]
    if variant == "no_tensorboard":
        return ["--log.tensorboard=false"]
    options = list(_OPTIONS.get(variant, []))
    if recipe == "stage1" and variant in _OPTIONS:
        # the memory format is set either way: the tiny sVQGAN now defaults to channels-last, and the table's
        # baseline stays the default layout it was measured against
        options.append(f"--model.channels_last={str(variant in CHANNELS_LAST_VARIANTS).lower()}")
    return options


class _Clock:
    """An after_step callback of the training loop: at every log step (the loop's own cadence, where it reads its
    scalars anyway) it synchronises the device and records (step, time). The timed window runs from the first such
    step at or past the warm-up to the last one, so compiles and cold caches stay outside it and no step is timed
    with more synchronisation than a run at that cadence has."""

    def __init__(self, log_every: int, warmup: int, device: str):
        self.log_every, self.warmup, self.device = log_every, warmup, device
        self.marks: list[tuple[int, float]] = []  # (step, perf_counter) at log steps >= warmup

    def __call__(self, step: int) -> None:
        if step % self.log_every == 0 and step >= self.warmup:
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.marks.append((step, time.perf_counter()))

    def steady(self) -> tuple[int, float]:
        """-> (timed steps, seconds) between the first and the last mark."""
        if len(self.marks) < 2:
            return 0, 0.0
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return s1 - s0, t1 - t0


def _compile_seconds(hist: list[dict], samples_per_step: int, steady_step_s: float) -> float:
    """Time of the first logging window beyond the same steps at the steady step time: what compiling cost."""
    if not hist or not steady_step_s:
        return float("nan")
    first = hist[0]
    window_s = first["step"] * samples_per_step / first["throughput/samples_per_s"]
    return max(0.0, window_s - first["step"] * steady_step_s)


def measure(recipe: str, variant: str, args, workdir: str, stage1_export: str | None) -> dict:
    cfg = bench_config(recipe, paper=args.paper, mid=args.mid)
    name = cfg.run.name
    log_every = args.log_every or cfg.log.every  # the config's own cadence unless asked otherwise
    out_dir = os.path.join(workdir, f"{recipe}-{variant}")
    overrides = [
        f"--data.synthetic_default={os.path.join(workdir, 'data')}",
        f"--data.synthetic_train_samples={args.samples}",
        f"--run.out_dir={out_dir}",
        f"--optim.max_steps={args.steps}",
        f"--run.max_seconds={args.seconds}",
        f"--log.every={log_every}",
        "--log.progress=false",
        f"--zero.precision={args.precision}",
        f"--optim.micro_batch={args.micro_batch}",
        "--run.keep_last=1",
        "--run.overwrite=true",  # repeats reuse the run directory
    ]
    if recipe == "stage1":
        # the full GAN step; no LPIPS: the benchmark machines hold no VGG-16 weights (asking for them is an error)
        overrides += ["--loss.disc_start=0", "--loss.perceptual_weight=0"]
    else:
        overrides.append(f"--stage1={stage1_export}")
    extra = _variant_overrides(recipe, variant)
    if "--run.compile=true" in extra:
        extra.append(f"--run.compile_backend={getattr(args, 'compile_backend', 'inductor')}")
    cfg = apply_overrides(cfg, overrides + extra)
    clock = _Clock(log_every, args.warmup, args.device)
    t0 = time.perf_counter()
    result = (train_stage1 if recipe == "stage1" else train_stage2)(cfg, after_step=[clock])
    wall = time.perf_counter() - t0
    from svq_fast import dist

    world = dist.world_size()
    steps, seconds = clock.steady()
    if not steps:
        raise RuntimeError(
            f"{recipe}/{variant}: the run stopped at step {result['step']} ({result['stop_reason']}), before two log "
            f"steps (every {log_every}) at or past the warm-up ({args.warmup}): raise --steps / --seconds or lower "
            "--log-every"
        )
    samples_per_step = args.micro_batch * cfg.optim.grad_accum * world
    sps = steps * samples_per_step / seconds
    compile_s = _compile_seconds(result["history"], samples_per_step, seconds / steps) if cfg.run.compile else 0.0
    hist = result["history"]
    if recipe == "stage1":
        rate = {"images_per_s": sps, "flops_per_sample": stage1_flops_per_sample(cfg, torch.device(args.device))}
    else:
        rate = {
            "tokens_per_s": sps * 2 * cfg.model.grid**2,
            "flops_per_sample": gpt_flops_per_sample(cfg, torch.device(args.device)),
        }
    gemm = gemm_peak_tflops(args.device, cfg.zero.precision)
    return {
        **rate,
        **mfu_fields(rate["flops_per_sample"], sps, args.device, cfg.zero.precision, gemm),
        "recipe": recipe,
        "config": name,
        "variant": variant,
        "device": args.device,
        "precision": cfg.zero.precision,
        "compiled": cfg.run.compile,
        "channels_last": getattr(cfg.model, "channels_last", False),
        "ranks": world,
        "compile_s": compile_s,
        "log_every": log_every,
        "steps": steps,  # timed steps (between the first log step past the warm-up and the last log step)
        "stop_step": result["step"],
        "stop_reason": result["stop_reason"],
        "samples_per_s": sps,
        "steps_per_s": steps / seconds,
        "peak_mem_mib": max(h["memory/peak_mib"] for h in hist),
        # measured inside the run: share of step time spent writing TensorBoard events (0 when it is off)
        "tensorboard_fraction": sum(h.get("time/tensorboard_fraction", 0.0) for h in hist) / len(hist),
        "wall_s": wall,
        "export": os.path.join(out_dir, "export"),
        "exported": os.path.isfile(os.path.join(out_dir, "export", "model.safetensors")),
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


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --smoke's and --table's settings applied."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--paper", action="store_true", help="paper-size configs (GPU)")
    p.add_argument("--mid", action="store_true", help="tiny configs at 2x width (bench_common.MID_OVERRIDES)")
    p.add_argument("--steps", type=int, default=21, help="max steps per run (the timed window ends at a log step)")
    p.add_argument("--warmup", type=int, default=3, help="the timed window starts at the first log step past this")
    p.add_argument("--log-every", type=int, default=0,
                   help="log cadence of the runs (default: the config's log.every, 10)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=0.0, help="per-run time limit (0 = none)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--samples", type=int, default=400, help="synthetic train samples to generate")
    p.add_argument("--recipes", default="stage1,stage2")
    p.add_argument("--variants", default="fused,ref,no_tensorboard")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved; medians are reported")
    p.add_argument("--out", default="")
    p.add_argument("--jsonl", default=None, help="append each run's row to this .jsonl file as it finishes")
    p.add_argument("--smoke", action="store_true",
                   help="tiny configs, CPU, runs stopped on --seconds (default 12), log every 2 steps")  # fmt: skip
    p.add_argument(
        "--table",
        action="store_true",
        help=f"the step's speed table: each run a fresh process on --ranks ranks; variants {TABLE_VARIANTS}",
    )
    p.add_argument("--ranks", type=int, default=1, help="--table: DeepSpeed ranks per run (CPU: gloo)")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--one", nargs=3, metavar=("RECIPE", "VARIANT", "WORKDIR"), help=argparse.SUPPRESS)
    p.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--stage1-export", default="",
                   help="stage 2's tokenizer (default: the export of this run's first stage-1 row); needed when "
                        "--recipes has stage2 without stage1")  # fmt: skip
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    if not args.one and "stage2" in recipes and "stage1" not in recipes and not args.stage1_export:
        p.error(
            "--recipes without stage1 trains no tokenizer for stage2: pass --stage1-export DIR (a stage-1 "
            "export of the same size, e.g. runs/demo/stage1/export)"
        )
    if args.stage1_export:
        args.stage1_export = os.path.abspath(args.stage1_export)  # the runs are child processes in other folders
        if not os.path.isfile(os.path.join(args.stage1_export, "model.safetensors")):
            p.error(f"--stage1-export {args.stage1_export}: no model.safetensors there")
    if args.smoke:
        args.paper, args.mid, args.micro_batch, args.samples, args.precision = False, False, 2, 16, "fp32"
        args.warmup, args.log_every = 1, 2
        # the GPU suite's control path: a time stop (not a step count) ends each run, stage 1's export of that run is
        # stage 2's tokenizer; the table's children stop on a step count
        args.steps, args.seconds = (5, 0.0) if args.table else (100_000, args.seconds or 12.0)
        args.variants = "eager_fp32,compiled_fp32,plain_fp32" if args.table else "fused"
        args.compile_backend = "aot_eager"
    if args.table and args.variants == p.get_default("variants"):
        args.variants = TABLE_VARIANTS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return _one(args)
    if args.table:
        return table(args)
    from bench_common import JsonlWriter

    jsonl = JsonlWriter(args.jsonl, "train")
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

    rows = []
    with tempfile.TemporaryDirectory() as work:
        stage1_export = args.stage1_export or None
        for recipe in args.recipes.split(","):
            # variants interleaved, repeat by repeat, so a slow drift of the machine hits all of them alike
            for repeat in range(args.repeats):
                for variant in args.variants.split(","):
                    row = measure(recipe, variant, args, work, stage1_export)
                    row["repeat"] = repeat
                    rows.append(row)
                    jsonl.write({k: v for k, v in row.items() if k != "export"})
                    if recipe == "stage1" and variant == "fused" and stage1_export is None:
                        stage1_export = _tokenizer_export(row)
                    print(
                        f"{recipe:7s} {variant:15s} #{repeat} {row['samples_per_s']:9.2f} samples/s over "
                        f"{row['steps']} steps, stopped at {row['stop_step']} ({row['stop_reason']})  "
                        f"mfu {row['mfu']:.3f} ({row['mfu_peak']})  peak {row['peak_mem_mib']:.0f} MiB",
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


def _tokenizer_export(row: dict) -> str:
    """The stage-1 row's export, which stage 2 trains on; an error naming the stop when the run made none."""
    if not row["exported"]:
        raise SystemExit(
            f"stage1/{row['variant']} stopped at step {row['stop_step']} ({row['stop_reason']}) without writing "
            f"{row['export']}: stage 2 has no tokenizer (a run stopped by run.max_seconds must export as one stopped "
            "by optim.max_steps does)"
        )
    return row["export"]


# ---------------------------------------------------------------------------------------------------- the table


def _one(args) -> int:
    """Child of --table: one measurement in this (fresh) process; rank 0 writes its row as JSON to --row-out."""
    from svq_fast import dist

    recipe, variant, work = args.one
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    row = measure(recipe, variant, args, work, args.stage1_export or None)
    row["peak_rss_mib"] = _peak_rss_mib()
    if dist.rank() == 0:
        with open(args.row_out, "w") as f:
            json.dump(row, f)
    return 0


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _common_args(args) -> list[str]:
    out = [f"--device={args.device}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--seconds={args.seconds}",
           f"--micro-batch={args.micro_batch}", f"--samples={args.samples}", f"--log-every={args.log_every}",
           f"--compile-backend={args.compile_backend}"]  # fmt: skip
    return out + _size_args(args)


def _size_args(args) -> list[str]:
    return (["--paper"] if args.paper else []) + (["--mid"] if args.mid else [])


def _run_child(cmd: list[str], what: str) -> None:
    import subprocess

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")


def _measure_isolated(recipe: str, variant: str, args, work: str, stage1_export: str | None, idx: int) -> dict:
    here = os.path.abspath(__file__)
    row_out = os.path.join(work, f"row{idx}.json")
    if variant.startswith("plain"):
        precision = variant.split("_", 1)[1]
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train_eager.py"), f"--recipes={recipe}",
               f"--precision={precision}", f"--device={args.device}", f"--steps={max(1, args.steps - args.warmup)}",
               f"--warmup={args.warmup}", f"--seconds={args.seconds}", f"--micro-batch={args.micro_batch * args.ranks}",
               f"--row-out={row_out}"] + _size_args(args)  # fmt: skip
        _run_child(cmd, f"{recipe}/{variant}")
        with open(row_out) as f:
            row = json.load(f)
        row.update(variant=variant, compile_s=0.0, ranks=1, compiled=False, channels_last=False)
        return row
    one = ["--one", recipe, variant, work, f"--row-out={row_out}", *_common_args(args)]
    if stage1_export:
        one.append(f"--stage1-export={stage1_export}")
    if args.ranks > 1:
        cmd = deepspeed_command(here, *one, ranks=args.ranks)
    else:
        cmd = [sys.executable, here, *one]
    _run_child(cmd, f"{recipe}/{variant}")
    with open(row_out) as f:
        return json.load(f)


def table(args) -> int:
    """Interleaved repeats of every (recipe, variant), each in a fresh process; prints the table with ratios to
    eager_fp32 of the same recipe; --out / --jsonl get the rows and the summary."""
    from bench_common import JsonlWriter

    jsonl = JsonlWriter(args.jsonl, "train_table")
    rows: list[dict] = []
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as work:
        stage1_export = args.stage1_export or None
        for recipe in args.recipes.split(","):
            for repeat in range(args.repeats):
                for variant in variants:
                    if variant in CHANNELS_LAST_VARIANTS and recipe != "stage1":
                        continue
                    t0 = time.perf_counter()
                    row = _measure_isolated(recipe, variant, args, work, stage1_export, len(rows))
                    row.update(repeat=repeat, process_s=time.perf_counter() - t0)
                    rows.append(row)
                    jsonl.write({k: v for k, v in row.items() if k != "export"})
                    if recipe == "stage1" and stage1_export is None and not variant.startswith("plain"):
                        stage1_export = _tokenizer_export(row)
                    print(f"{recipe:7s} {variant:22s} #{repeat} {row['samples_per_s']:8.2f} samples/s  "
                          f"compile {row.get('compile_s', 0.0):6.1f} s  "
                          f"peak RSS {row.get('peak_rss_mib', 0):6.0f} MiB  "
                          f"({row['process_s']:.0f} s)", flush=True)  # fmt: skip
            if recipe == "stage1" and stage1_export is None and "stage2" in args.recipes:
                raise SystemExit("stage2 needs a stage1 stack variant first (it exports the tokenizer)")
    summary = summarize_table(rows)
    print_table(summary, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": rows, "summary": summary}, f, indent=1)
    return 0


def summarize_table(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["recipe"], r["variant"]) for r in rows):
        runs = [r for r in rows if (r["recipe"], r["variant"]) == key]
        sps = [r["samples_per_s"] for r in runs]
        comp = [r.get("compile_s", 0.0) for r in runs]
        out.append({
            "recipe": key[0], "variant": key[1], "repeats": len(runs), "samples_per_s": statistics.median(sps),
            "samples_per_s_min": min(sps), "samples_per_s_max": max(sps),
            "peak_rss_mib": statistics.median(r.get("peak_rss_mib", float("nan")) for r in runs),
            "compile_s_first": comp[0], "compile_s_later": statistics.median(comp[1:]) if len(comp) > 1 else comp[0],
        })  # fmt: skip
    for row in out:
        base = next((r for r in out if r["recipe"] == row["recipe"] and r["variant"] == "eager_fp32"), None)
        row["vs_eager_fp32"] = row["samples_per_s"] / base["samples_per_s"] if base else float("nan")
    return out


def print_table(summary: list[dict], args) -> None:
    print(f"\nstep speed, {args.device}, {args.ranks} rank(s) x micro-batch {args.micro_batch}, "
          f"{args.steps} steps ({args.warmup} warm-up), medians of {args.repeats} interleaved repeats")  # fmt: skip
    print(f"{'recipe':8s}{'variant':23s}{'samples/s':>10s}{'min-max':>16s}{'vs eager_fp32':>15s}{'peak RSS MiB':>14s}"
          f"{'compile s (cold/warm)':>24s}")  # fmt: skip
    for r in summary:
        print(f"{r['recipe']:8s}{r['variant']:23s}{r['samples_per_s']:10.2f}{r['samples_per_s_min']:8.2f}-"
              f"{r['samples_per_s_max']:<7.2f}{r['vs_eager_fp32']:15.3f}{r['peak_rss_mib']:14.0f}"
              f"{r['compile_s_first']:15.1f} / {r['compile_s_later']:6.1f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
