"""The baseline for bench_train.py: the same architectures trained in plain eager torch, as a user without this
stack would: no fused ops (reference VQ, one-hot + conv semantic input, SDPA attention, full-logit
cross-entropy), no DeepSpeed, torch.optim.AdamW, bf16 autocast, random inputs already on the device.

    python benchmarks/bench_train_eager.py --device cuda --paper --seconds 20 --jsonl rows.jsonl
    python benchmarks/bench_train_eager.py --smoke               # tiny configs, CPU, a few steps (CI)

Stage 1 step: generator fwd + bwd on (L1 + texture + disc_weight x adaptive weight x adversarial + vq) image loss and
(CE + vq) semantic loss, the adaptive weight as taming computes it (two autograd.grad passes to the image decoder's last
weight; the stack runs its own equivalent passes, so the ratio compares like with like), the discriminator on real +
fake (hinge) and its step; no LPIPS (the GPU image has no VGG weights). Stage 2 step:
SemanticGPT (attn_backend="sdpa", chunked_ce=False) fwd + bwd + step on random token sequences.
Rows: images_per_s (stage 1) / tokens_per_s (stage 2), and MFU = FLOPs per sample (svq_fast.train's counters,
the ones the stack reports) x samples/s over the datasheet peak named in mfu_peak (svq_fast.train.perf) and, as
mfu_measured_peak, over a GEMM in the run's precision measured in the same process (bench_common.mfu_fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from bench_common import (  # benchmarks/bench_common.py
    JsonlWriter,
    bench_config,
    gemm_peak_tflops,
    mfu_fields,
    precision_note,
    sync,
)

from svq_fast.losses.gan import generator_adv_loss, hinge_d_loss
from svq_fast.losses.reconstruction import texture_loss
from svq_fast.models.gpt import SemanticGPT
from svq_fast.models.svq import PatchDiscriminator, SVQModel
from svq_fast.nn.semantic_input import SemanticConv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_mib() -> float:
    """This process's peak resident memory (a bench_train.py --table row runs in a fresh process)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _eager_svq(cfg):
    model = SVQModel(cfg.model, dataclasses.replace(cfg.quantizer, backend="ref"))
    for m in model.modules():
        if isinstance(m, SemanticConv):
            m.backend = "ref"  # one-hot + F.conv2d
    return model


def _run(step, seconds: float, steps: int, warmup: int, device: str) -> tuple[int, float]:
    """Run warm-up steps, then timed steps until `steps` or `seconds` -> (timed steps, seconds)."""
    for _ in range(warmup):
        step()
    sync(device)
    t0, n = time.perf_counter(), 0
    while n < steps and (seconds <= 0 or time.perf_counter() - t0 < seconds):
        step()
        n += 1
    sync(device)
    return n, time.perf_counter() - t0


def stage1(args, peak: float) -> dict:
    from svq_fast.train.stage1 import stage1_flops_per_sample

    cfg = bench_config("stage1", paper=args.paper, mid=args.mid)
    dev, b, size = args.device, args.micro_batch, cfg.model.image_size
    gen = _eager_svq(cfg).to(dev)
    disc = PatchDiscriminator(ch=cfg.loss.disc_ch, n_layers=cfg.loss.disc_layers).to(dev)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-4, fused=dev == "cuda")
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, fused=dev == "cuda")
    x = torch.rand(b, 3, size, size, device=dev) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    s = torch.randint(0, cfg.model.num_classes, (b, size, size), device=dev)  # (B, H, W)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with amp:
            out = gen(x if gen.has_image else None, s if gen.has_semantic else None)
            loss = torch.zeros((), device=dev)
            if gen.has_image:
                x_hat = out["x_hat"]
                loss = loss + (x_hat.float() - x).abs().mean()
                if cfg.loss.texture_weight:
                    loss = loss + cfg.loss.texture_weight * texture_loss(x_hat, x, cfg.loss.texture_window)
                for p in disc.parameters():
                    p.requires_grad_(False)
                g_loss = generator_adv_loss(disc(x_hat), cfg.loss.gan_loss)
                for p in disc.parameters():
                    p.requires_grad_(True)
                d_weight = 1.0
                if cfg.loss.adaptive_weight:  # taming's way: two partial backward passes to the last layer's weight
                    nll = loss  # L1 (+ texture): what the stack's adaptive weight balances against the GAN term
                    w = gen.image_last_layer().weight
                    g_nll = torch.autograd.grad(nll, w, retain_graph=True)[0]
                    g_adv = torch.autograd.grad(g_loss, w, retain_graph=True)[0]
                    d_weight = (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, cfg.loss.adaptive_weight_max).detach()
                loss = loss + cfg.loss.disc_weight * d_weight * g_loss + out["vq_loss_x"]
            if gen.has_semantic:
                loss = loss + F.cross_entropy(out["s_logits"].float(), s, ignore_index=255) + out["vq_loss_s"]
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if gen.has_image:
            with amp:
                logits = disc(torch.cat([x, out["x_hat"].detach()])).float()
                d_loss = hinge_d_loss(logits[:b], logits[b:])
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

    n, sec = _run(step, args.seconds, args.steps, args.warmup, dev)
    flops = stage1_flops_per_sample(cfg, torch.device(dev))
    ips = n * b / sec
    return dict(recipe="stage1", config=cfg.run.name, variant="eager", images_per_s=ips, samples_per_s=ips,
                **mfu_fields(flops, ips, dev, args.precision, peak), steps=n, micro_batch=b)  # fmt: skip


def stage2(args, peak: float) -> dict:
    from svq_fast.train.stage2 import gpt_flops_per_sample

    cfg = bench_config("stage2", paper=args.paper, mid=args.mid)
    dev, b = args.device, args.micro_batch
    model = SemanticGPT(dataclasses.replace(cfg.model, attn_backend="sdpa"), chunked_ce=False).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    n_tok = cfg.model.grid**2
    sem = torch.randint(0, cfg.model.semantic_vocab, (b, n_tok), device=dev)  # (B, grid^2)
    img = torch.randint(0, cfg.model.image_vocab, (b, n_tok), device=dev)  # (B, grid^2)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with amp:
            _, loss = model(sem, img)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    n, sec = _run(step, args.seconds, args.steps, args.warmup, dev)
    flops = gpt_flops_per_sample(cfg, torch.device(dev))
    sps = n * b / sec
    return dict(recipe="stage2", config=cfg.run.name, variant="eager", samples_per_s=sps,
                tokens_per_s=sps * 2 * n_tok, **mfu_fields(flops, sps, dev, args.precision, peak), steps=n,
                micro_batch=b)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--paper", action="store_true", help="paper-size configs (GPU)")
    p.add_argument("--mid", action="store_true", help="tiny configs at 2x width (bench_common.MID_OVERRIDES)")
    p.add_argument("--recipes", default="stage1,stage2")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--smoke", action="store_true", help="tiny configs, 2 steps, CPU (CI)")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--row-out", default="", help="write the (last) row as JSON here (bench_train.py --table)")
    args = p.parse_args(argv)
    if args.smoke:
        args.paper, args.mid, args.micro_batch, args.steps, args.warmup, args.seconds = False, False, 2, 2, 1, 0.0
        args.precision = "fp32"
    peak = gemm_peak_tflops(args.device, args.precision)
    print(f"bench_train_eager on {args.device}: {args.precision} GEMM {peak:.1f} TFLOP/s, {precision_note()}",
          flush=True)  # fmt: skip
    out = JsonlWriter(args.jsonl, "train")
    for recipe in args.recipes.split(","):
        row = {"stage1": stage1, "stage2": stage2}[recipe](args, peak)
        row.update(device=args.device, precision=args.precision, peak_rss_mib=_peak_rss_mib())
        out.write(row)
        if args.row_out:
            with open(args.row_out, "w") as f:
                json.dump(row, f)
        rate = f"{row['images_per_s']:.2f} images/s" if recipe == "stage1" else f"{row['tokens_per_s']:.0f} tokens/s"
        print(f"{recipe} eager: {rate}, MFU {row['mfu']:.3f} of {row['mfu_peak']}, {row['mfu_measured_peak']:.3f} of "
              f"the measured GEMM ({row['steps']} steps)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
