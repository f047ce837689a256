"""Write the demo's report.md: training curves' end points, stage-1 reconstruction quality on held-out
synthetic scenes (semantic mIoU, pixel accuracy, image L1 / PSNR), codebook usage, and the sample grid.

    python recipes/demo_report.py --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from svq_fast.data.loader import make_loader
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.train.data import resolve_shards
from svq_fast.train.pretrained import load_stage1


@torch.no_grad()
def stage1_metrics(export_dir: str, max_samples: int = 256) -> dict:
    model, cfg = load_stage1(export_dir)
    loader = make_loader(
        resolve_shards(cfg.data, "val", 0),
        batch_size=32,
        image_size=cfg.data.image_size,
        resampled=False,
        flip=False,
        shuffle_buffer=1,
    )
    cm = ConfusionMatrix(cfg.model.num_classes, cfg.model.ignore_index)
    l1, mse, n = 0.0, 0.0, 0
    used_x, used_s = set(), set()
    for batch in loader:
        x, s = batch["image"], batch["label"]
        out = model(x, s)
        cm.update(out["s_logits"].argmax(1), s)
        l1 += (out["x_hat"] - x).abs().mean((1, 2, 3)).sum().item()
        mse_b = ((out["x_hat"].clamp(-1, 1) - x) / 2).pow(2).mean((1, 2, 3))  # on [0, 1] scale
        mse += (10 * torch.log10(1 / mse_b.clamp_min(1e-10))).sum().item()
        used_x.update(out["indices_x"].unique().tolist())
        used_s.update(out["indices_s"].unique().tolist())
        n += x.shape[0]
        if n >= max_samples:
            break
    return {
        "val_samples": n,
        "semantic_miou": cm.miou(),
        "semantic_pixel_acc": cm.pixel_accuracy(),
        "image_l1": l1 / n,
        "image_psnr_db": mse / n,
        "image_codes_used": f"{len(used_x)}/{cfg.quantizer.image_codebook_size}",
        "semantic_codes_used": f"{len(used_s)}/{cfg.quantizer.semantic_codebook_size}",
    }


def _last(history_file: str) -> dict:
    with open(history_file) as f:
        hist = json.load(f)
    return hist[-1] if hist else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--timings", default="", help="JSON file of stage timings written by demo.sh")
    args = p.parse_args(argv)
    run = args.run_dir
    m = stage1_metrics(os.path.join(run, "stage1", "export"))
    s1, s2 = _last(os.path.join(run, "stage1", "history.json")), _last(os.path.join(run, "stage2", "history.json"))
    timings = {}
    if args.timings and os.path.exists(args.timings):
        with open(args.timings) as f:
            timings = json.load(f)
    lines = [
        "# svq_fast demo report",
        "",
        "Tiny sVQGAN (stage 1) and GPT (stage 2) trained on the built-in synthetic scenes (64x64, 16 classes),",
        "2 CPU ranks under DeepSpeed. Numbers below are from this run.",
        "",
        "## Stage 1: reconstruction of held-out scenes",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items()]
    lines += [
        "",
        "## Training end points (mean of the last logging window)",
        "",
        "| stage | metric | value |",
        "|---|---|---|",
    ]
    lines += [f"| 1 | {k} | {v:.4f} |" for k, v in s1.items() if k != "step"]
    lines += [f"| 2 | {k} | {v:.4f} |" for k, v in s2.items() if k != "step"]
    if timings:
        lines += ["", "## Wall-clock", "", "| part | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [
        "",
        "## Samples",
        "",
        "Rows: semantic map | reference image | samples from the GPT.",
        "",
        "![samples](samples/grid.png)",
        "",
        "TensorBoard: `tensorboard --logdir " + run + "`",
        "",
    ]
    with open(os.path.join(run, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(run, "metrics.json"), "w") as f:
        json.dump({"stage1_val": m, "stage1_train_last": s1, "stage2_train_last": s2, "timings": timings}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
