"""Write the demo's report.md: a short version of the synthetic Tables 1-3 for the demo's own models (from the
evaluate.py results under <run-dir>/eval), the diversity rows and the evaluation protocol, training curves' end
points, wall-clock, and the sample grids: samples/grid.png (recipes/sample.py) and samples/grid_rerenders.png (each
map beside two real re-renders of its layout and its samples, made here from sample.py's PNGs).

    python recipes/demo_report.py --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from svq_fast.eval.report import diagnostics_markdown, diversity_markdown, protocol_markdown
from svq_fast.train.checkpoint import complete_checkpoints, read_manifest


def _load_metrics(path: str) -> dict:
    return _load(path)["metrics"]


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def rerender_grid(samples_dir: str, shards: str, rerenders: int = 2) -> str | None:
    """samples/grid_rerenders.png: per map of recipes/sample.py's run, the map | `rerenders` real re-renders of its
    layout (texture seeds 0..n-1, data/synthetic.py) | its samples. None (no file) when the samples or the synthetic
    shards are missing."""
    import numpy as np
    import torch
    from PIL import Image

    from svq_fast.data.synthetic import NUM_CLASSES, render_scene
    from svq_fast.eval.diversity import Rerenders
    from svq_fast.eval.visualize import colorize, grid, save_png

    settings_file = os.path.join(samples_dir, "settings.json")
    if not os.path.exists(settings_file) or not os.path.isdir(shards):
        return None
    source = Rerenders([shards])
    if not source.available:
        return None
    settings = _load(settings_file)
    rows = []
    for key in settings["keys"]:
        index = int(key.removeprefix("syn"))
        label = torch.from_numpy(render_scene(source.spec, index)[1].astype("int64"))[None]  # (1, H, W)
        real = source.render([key], rerenders, label)  # (n, 3, H, W) in [-1, 1]
        files = sorted(f for f in os.listdir(samples_dir) if f.startswith(f"{key}_sample") and f.endswith(".png"))
        samples = [torch.from_numpy(np.array(Image.open(os.path.join(samples_dir, f)))).permute(2, 0, 1) / 255.0
                   for f in files]  # fmt: skip
        rows.append([colorize(label, NUM_CLASSES)[0], *((real + 1) / 2), *samples])
    out = os.path.join(samples_dir, "grid_rerenders.png")
    save_png(grid(rows), out)
    return out


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
    p.add_argument(
        "--shards", default="", help="held-out synthetic shards of the samples (default <run-dir>/data/64px/val)"
    )
    args = p.parse_args(argv)
    run = args.run_dir
    rec = _load_metrics(os.path.join(run, "eval", "stage1", "metrics.json"))
    gen_all = _load(os.path.join(run, "eval", "stage2", "metrics.json"))
    gen, gen_settings = gen_all["metrics"], gen_all.get("settings", {})
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
    if "diversity" in gen:
        lines += diversity_markdown(gen["diversity"])
    if "diagnostics" in gen:
        lines += diagnostics_markdown(gen["diagnostics"])
    if "protocol" in gen_settings:  # the generation evaluation's (eval/stage2/metrics.json, settings.protocol)
        lines += protocol_markdown(gen_settings["protocol"], gen_settings)
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
    samples_dir = os.path.join(run, "samples")
    sample_settings = os.path.join(samples_dir, "settings.json")
    condition = _load(sample_settings).get("condition", "reference") if os.path.exists(sample_settings) else "?"
    lines += [
        "",
        "## Samples",
        "",
        f"Rows: semantic map | reference image | samples from the GPT (z_s: {condition}; recipes/sample.py).",
        "",
        "![samples](samples/grid.png)",
        "",
    ]
    if rerender_grid(samples_dir, args.shards or os.path.join(run, "data", "64px", "val")):
        lines += [
            "One map, many images: rows: semantic map | two real re-renders of its layout (fresh textures) | the "
            "same samples.",
            "",
            "![samples beside re-renders](samples/grid_rerenders.png)",
            "",
        ]
    lines += [
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
