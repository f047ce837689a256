"""Write the demo's report.md: a short version of the synthetic Tables 1-3 for the demo's own models (from the
evaluate.py results under <run-dir>/eval), training curves' end points, wall-clock, and the sample grid.

    python recipes/demo_report.py --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from svq_fast.eval.report import diagnostics_markdown
from svq_fast.train.checkpoint import complete_checkpoints, read_manifest


def _load_metrics(path: str) -> dict:
    with open(path) as f:
        return json.load(f)["metrics"]


def _pct(v) -> str:
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) else str(v)


def _num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def short_tables(rec: dict, gen: dict) -> list[str]:
    """Tables 1-3 of the synthetic experiment (recipes/experiments/synthetic_tables.py) for this run's models:
    rec = evaluate.py stage-1 metrics of the sVQGAN, gen = stage-2 metrics of its GPT."""
    return [
        "## Table 1: semantic image synthesis (sVQGAN-T, one sample per held-out map)",
        "",
        "| FSD ↓ | SSIM ↑ | seg. mIoU (%) ↑ | PSNR (dB) ↑ | seg. mIoU on real images (%) |",
        "|---|---|---|---|---|",
        f"| {_num(gen['fsd'])} | {_num(gen['ssim'])} | {_pct(gen.get('segmenter_miou_generated'))} | "
        f"{_num(gen['psnr_db'], 2)} | {_pct(gen.get('segmenter_miou_real'))} |",
        "",
        "## Table 2: image reconstruction (sVQGAN)",
        "",
        "| SSIM ↑ | PSNR (dB) ↑ | FSD ↓ |",
        "|---|---|---|",
        f"| {_num(rec['ssim'])} | {_num(rec['psnr_db'], 2)} | {_num(rec['fsd'])} |",
        "",
        "## Table 3: semantic reconstruction (sVQGAN)",
        "",
        "| mIoU (%) ↑ | pixel acc. (%) | mIoU from the map alone (%) |",
        "|---|---|---|",
        f"| {_pct(rec['semantic_miou'])} | {_pct(rec['semantic_pixel_acc'])} | "
        f"{_pct(rec.get('semantic_miou_map_only'))} |",
        "",
        "FSD: Frechet distance in the feature space of a small segmenter trained on real synthetic scenes (not FID);",
        "seg. mIoU: that segmenter's mIoU on generated images against the maps they were conditioned on.",
    ]


def discriminator_health(last: dict) -> list[str]:
    """The stage-1 discriminator on a fixed held-out batch at the end of training: real vs reconstruction logits."""
    if "disc_heldout_gap" not in last:
        return []
    return [
        "## Discriminator at the end of stage 1 (fixed held-out batch)",
        "",
        "| mean logit on real images | on their reconstructions | gap (real - recon) |",
        "|---|---|---|",
        f"| {_num(last['disc_heldout_real'], 3)} | {_num(last['disc_heldout_recon'], 3)} | "
        f"{_num(last['disc_heldout_gap'], 3)} |",
        "",
    ]


def _ranks(stage_dir: str) -> str:
    """How many ranks trained a stage, as its newest complete checkpoint's manifest records it ('?' without one)."""
    tags = complete_checkpoints(stage_dir)
    return str((read_manifest(tags[-1]) or {}).get("world_size", "?")) if tags else "?"


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
    rec = _load_metrics(os.path.join(run, "eval", "stage1", "metrics.json"))
    gen = _load_metrics(os.path.join(run, "eval", "stage2", "metrics.json"))
    s1, s2 = _last(os.path.join(run, "stage1", "history.json")), _last(os.path.join(run, "stage2", "history.json"))
    timings = {}
    if args.timings and os.path.exists(args.timings):
        with open(args.timings) as f:
            timings = json.load(f)
    lines = [
        "# svq_fast demo report",
        "",
        "Tiny sVQGAN (stage 1) and GPT (stage 2) trained on the built-in synthetic scenes (64x64, 16 classes),",
        f"under DeepSpeed on CPU (stage 1 on {_ranks(os.path.join(run, 'stage1'))} ranks, stage 2 on "
        f"{_ranks(os.path.join(run, 'stage2'))}). Numbers below are from this run, on "
        f"{gen['images_scored']} (generation) / {rec['images_scored']} (reconstruction) held-out scenes; "
        "full per-class tables in eval/stage1|2/metrics.md.",
        "",
        *short_tables(rec, gen),
        "",
    ]
    if "diagnostics" in gen:
        lines += diagnostics_markdown(gen["diagnostics"])
    lines += discriminator_health(s1)
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
        json.dump(
            {
                "stage1_val": rec,
                "stage2_val": gen,
                "stage1_train_last": s1,
                "stage2_train_last": s2,
                "timings": timings,
            },
            f,
            indent=1,
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
