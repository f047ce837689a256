"""Do larger and non-square maps sample as well as training-size ones? (issue 30's targets)

Synthetic scenes (svq_fast.data.synthetic, test-range indices: disjoint from the train and val splits) are rendered
at the model's size (64) and at 128 (the same generator, `size=128`; 64x128 maps are the middle 64 rows of a
128 scene). Every map is sampled from the map alone (encode_semantic), larger ones by the sliding window
(svq_fast/eval/sliding_window.py) at each --strides value, and scored by the evaluation segmenter:
- seg. mIoU: one confusion matrix over 64x64 pieces (the four quarters of a 128x128 sample, the two halves of a
  64x128 one, the whole of a 64x64 one) against the map; target: larger maps >= 0.9x the 64x64 score. The real
  scenes' score over the same pieces is printed beside it (the instrument at that scene scale).
- seams: mean absolute difference of neighbouring pixels (mean over RGB, images in [0, 1]) across the pixel
  boundaries where consecutive tokens change window, divided by the same mean over (a) every other pair of
  neighbouring pixels (the issue's measure) and (b) the token boundaries within two tokens of each seam that do not
  change window (pixel pairs at a multiple of the downsampling factor: the decoder's own grid, at the same place in
  the image, so only the window change differs; the image's gradient level varies across it); target <= 1.2.
  The same ratios on the real 128 scenes at the same positions are the control (no seams there).
- understood: agreement of the semantic decoder's reading of z_s with the map (how the stage-1 encoder, whose mid
  attention block attends over the whole larger latent grid, reads larger maps).
A 128-px scene is the 64-px scene's layout drawn at twice the scale (objects and texture periods twice as many
pixels), which moves the segmenter too; the mosaic sets (2x2 or 1x2 different 64-px scenes side by side) keep the
training scale, so their pieces compare with the 64x64 row on the sampler alone.

    python recipes/experiments/sampling_any_size.py --gpt runs/demo/stage2/export --out runs/any_size --scenes 64

Writes <out>/results.json, <out>/report.md and <out>/samples_<H>x<W>_stride<S>.png (the first 4 maps).
--write-maps DIR also writes the 128x128 label PNGs it samples (inputs for recipes/sample.py --maps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from svq_fast.data.synthetic import SyntheticSpec, render_scene
from svq_fast.eval.image_metrics import quantize_uint8
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.eval.sampling import sample_images
from svq_fast.eval.sliding_window import default_stride, window_cost, window_starts
from svq_fast.eval.visualize import colorize, grid, save_png, to_unit
from svq_fast.export import load_gpt, load_segmenter, load_tokenizer

TEST_OFFSET = 20_000_000  # make_shards' "test" split offset: scenes no split of the demo trains or validates on
PIECE = 64


def scenes(size: int, n: int, crop_rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n test-range scenes at `size`: images (n, 3, H, W) in [-1, 1], labels (n, H, W) int64."""
    imgs, labs = [], []
    for k in range(n):
        img, lab = render_scene(SyntheticSpec(size=size), TEST_OFFSET + k)
        if crop_rows is not None:
            img, lab = img[crop_rows[0] : crop_rows[1]], lab[crop_rows[0] : crop_rows[1]]
        imgs.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1)
        labs.append(torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64)))
    return torch.stack(imgs), torch.stack(labs)


def mosaic(n: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n maps of rows x cols different 64-px scenes side by side: a larger map whose content has the training scale
    (the 64x64 pieces the segmenter scores are exactly those scenes)."""
    img, lab = scenes(64, n * rows * cols)
    img = img.view(n, rows, cols, 3, 64, 64).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, rows * 64, cols * 64)
    lab = lab.view(n, rows, cols, 64, 64).permute(0, 1, 3, 2, 4).reshape(n, rows * 64, cols * 64)
    return img, lab


SETS = {  # name -> maker(n): the 64x64 baseline gets 4x as many maps (the same number of 64x64 pieces as 128x128)
    "64x64": lambda n: scenes(64, 4 * n),
    "128x128": lambda n: scenes(128, n),
    "64x128": lambda n: scenes(128, n, crop_rows=(32, 96)),
    "mosaic128x128": lambda n: mosaic(n, 2, 2),
    "mosaic64x128": lambda n: mosaic(n, 1, 2),
}


def pieces(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/64 * W/64, C, 64, 64): the 64x64 pieces, row-major within each image."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PIECE, PIECE, w // PIECE, PIECE).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c, PIECE, PIECE)


@torch.no_grad()
def seg_miou(segmenter, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    cm = ConfusionMatrix(num_classes)
    for k in range(0, images.shape[0], 64):
        x = pieces(quantize_uint8(images[k : k + 64]))
        s = pieces(labels[k : k + 64, None])[:, 0]
        cm.update(segmenter(x).argmax(1), s)
    return cm.miou()


def seam_stats(images: torch.Tensor, latent: tuple[int, int], g: int, stride: int, f: int) -> dict:
    """Mean |neighbour difference| across window changes vs other pairs / other token boundaries (see docstring)."""
    x = to_unit(images.float())  # (B, 3, H, W)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(1)  # (B, H, W-1): pair p is columns p | p+1
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(1)  # (B, H-1, W)
    out = {}
    seam_sum = seam_n = other_sum = other_n = tok_sum = tok_n = 0.0
    for d, n, axis in ((dx, latent[1], -1), (dy, latent[0], -2)):
        starts = window_starts(n, g, stride)
        switch = [j for j in range(1, n) if starts[j] != starts[j - 1]]
        pairs = d.shape[axis]
        is_seam = torch.zeros(pairs, dtype=torch.bool)
        is_seam[[j * f - 1 for j in switch]] = True
        is_tok = torch.zeros(pairs, dtype=torch.bool)  # token boundaries near a seam, not themselves seams
        near = {j + d for j in switch for d in (-2, -1, 1, 2)} - set(switch)
        is_tok[[j * f - 1 for j in sorted(near) if 1 <= j < n]] = True
        per = d.mean(dim=(0, 1) if axis == -1 else (0, 2))  # (pairs,) mean per pixel boundary
        rows = d.shape[1] if axis == -1 else d.shape[2]
        weight = d.shape[0] * rows
        seam_sum += float(per[is_seam].sum()) * weight
        seam_n += int(is_seam.sum()) * weight
        other_sum += float(per[~is_seam].sum()) * weight
        other_n += int((~is_seam).sum()) * weight
        tok_sum += float(per[is_tok].sum()) * weight
        tok_n += int(is_tok.sum()) * weight
    if seam_n == 0:
        return {"seam_boundaries": 0}
    seam = seam_sum / seam_n
    out.update(
        seam_grad=seam,
        ratio_vs_all_pairs=seam / (other_sum / other_n),
        ratio_vs_token_boundaries=seam / (tok_sum / tok_n) if tok_n else float("nan"),
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", required=True)
    p.add_argument("--segmenter", default="svq_fast/eval/assets/segmenter_synthetic64")
    p.add_argument("--out", required=True)
    p.add_argument("--scenes", type=int, default=64, help="maps per size (the 64x64 row uses 4x as many)")
    p.add_argument("--strides", default="", help="comma list of window strides (default: grid // 2 and grid)")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma list from {list(SETS)} (64x64 always runs)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--write-maps", default="", help="also write the 128x128 label PNGs here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    gpt, cfg = load_gpt(args.gpt, dev)
    tok = load_tokenizer(cfg, dev)
    s1 = tok.semantic_model or tok.image_model
    seg, seg_meta = load_segmenter(args.segmenter, dev)
    g, f, size = cfg.model.grid, s1.cfg.downsampling, cfg.data.image_size
    if size != PIECE:
        sys.exit(f"this experiment scores 64x64 pieces; the model's size is {size}")
    strides = [int(v) for v in args.strides.split(",")] if args.strides else [default_stride(g), g]
    sample_kw = dict(
        temperature=cfg.sample.temperature,
        top_k=cfg.sample.top_k,
        top_p=cfg.sample.top_p,
        guidance_scale=cfg.sample.guidance_scale,
    )
    os.makedirs(args.out, exist_ok=True)
    names = ["64x64"] + [v for v in args.sets.split(",") if v and v != "64x64"]
    unknown = sorted(set(names) - set(SETS))
    if unknown:
        sys.exit(f"--sets: unknown {unknown}; known: {list(SETS)}")
    if args.write_maps:
        os.makedirs(args.write_maps, exist_ok=True)
        for k, lab in enumerate(SETS["128x128"](args.scenes)[1]):
            Image.fromarray(lab.numpy().astype(np.uint8)).save(os.path.join(args.write_maps, f"scene{k:03d}.png"))
    rows = []
    for name in names:
        real, lab = SETS[name](args.scenes)
        h, w = lab.shape[1:]
        latent = (h // f, w // f)
        for stride in [None] if latent == (g, g) else strides:
            t0 = time.perf_counter()
            images, understood = [], []
            for k in range(0, lab.shape[0], args.batch):
                s = lab[k : k + args.batch]
                sem = tok.semantic_tokens(None, s, "map")
                z_s = s1.quantizer_s.lookup(sem.view(-1, *latent))
                understood.append(s1.semantic_labels(s1.decode_semantic(z_s)))
                gen = torch.Generator().manual_seed(args.seed + k)
                images.append(
                    sample_images(
                        gpt, tok, sem, generator=gen, latent_shape=latent, window_stride=stride, **sample_kw
                    ).cpu()
                )
            images, understood = torch.cat(images), torch.cat(understood)
            seconds = time.perf_counter() - t0
            row = {
                "maps": name,
                "n": int(lab.shape[0]),
                "latent": list(latent),
                "stride": stride,
                "seg_miou": seg_miou(seg, images, lab, s1.cfg.num_classes),
                "seg_miou_real": seg_miou(seg, real, lab, s1.cfg.num_classes),
                "understood_agreement": float((understood == lab).float().mean()),
                "seconds": round(seconds, 1),
                "seconds_per_map": round(seconds / lab.shape[0], 3),
            }
            if stride is not None:
                row.update(window_cost(*latent, g, stride))
                row.update(seam_stats(images, latent, g, stride, f))
                control = seam_stats(real, latent, g, stride, f)
                row["real_ratio_vs_all_pairs"] = control.get("ratio_vs_all_pairs")
                row["real_ratio_vs_token_boundaries"] = control.get("ratio_vs_token_boundaries")
            rows.append(row)
            print(json.dumps(row), flush=True)
            shown = colorize(lab[:4], s1.cfg.num_classes)
            tag = name + (f"_stride{stride}" if stride else "")
            save_png(
                grid([[shown[i], to_unit(real[i]), to_unit(images[i])] for i in range(min(4, len(shown)))]),
                os.path.join(args.out, f"samples_{tag}.png"),
            )
    base = next(r for r in rows if r["maps"] == "64x64")["seg_miou"]
    for r in rows:
        r["vs_64x64"] = r["seg_miou"] / base
    result = {
        "args": vars(args),
        "gpt": os.path.abspath(args.gpt),
        "grid": g,
        "factor": f,
        "segmenter_val_miou": seg_meta.get("val_miou"),
        "sampling": sample_kw,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [
        "| maps | n | window stride | seg. mIoU % (64x64 pieces) | vs 64x64 | real scenes' % | understood % | "
        "seam / all pairs | seam / nearby token bounds | real: same two | windows | GPT positions | s per map |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"

    for r in rows:
        lines.append(
            f"| {r['maps']} | {r['n']} | {r['stride'] or '-'} | {100 * r['seg_miou']:.1f} | {r['vs_64x64']:.2f} | "
            f"{100 * r['seg_miou_real']:.1f} | {100 * r['understood_agreement']:.1f} | "
            f"{fmt(r.get('ratio_vs_all_pairs'))} | {fmt(r.get('ratio_vs_token_boundaries'))} | "
            f"{fmt(r.get('real_ratio_vs_all_pairs'))}, {fmt(r.get('real_ratio_vs_token_boundaries'))} | "
            f"{r.get('windows', 1)} | {r.get('positions', 2 * g * g - 1)} | {r['seconds_per_map']} |"
        )
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
