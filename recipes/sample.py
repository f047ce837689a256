"""Sample images from semantic maps with a trained GPT (+ its stage-1 model), and write a grid.

    python recipes/sample.py --gpt runs/demo/stage2/export --out runs/demo/samples --num-maps 6 --samples-per-map 3

Semantic maps come from held-out shards (--shards, default: the synthetic val split). --condition reference
(the default) encodes z_s from (reference image, map) as in the paper; --condition map encodes it from the map
alone (`encode_semantic`, as the synthesis page does), so no appearance of the reference leaks into the samples.
Writes grid.png (rows: semantic map | reference |
samples), one PNG per sample, and settings.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from svq_fast.data.loader import list_shards, make_loader
from svq_fast.data.run_shards import shards_or_synthetic
from svq_fast.eval.sampling import sample_images
from svq_fast.eval.visualize import colorize, grid, save_png, to_unit
from svq_fast.export import load_gpt, load_tokenizer

CONDITIONS = ("reference", "map")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", required=True, help="stage-2 export directory (model.safetensors + config.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", default="", help="held-out shards (default: synthetic val split)")
    p.add_argument("--num-maps", type=int, default=6)
    p.add_argument("--samples-per-map", type=int, default=3)
    g = p.add_argument_group("sampling (defaults: the GPT config's sample section)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--condition",
        choices=CONDITIONS,
        default="reference",
        help="z_s from (reference image, map) as in the paper, or from the map alone (encode_semantic)",
    )
    p.add_argument(
        "--allow-stage1-mismatch",
        action="store_true",
        help="use the stage-1 export even if its weights differ from the ones the GPT was trained on",
    )
    args = p.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpt, cfg = load_gpt(args.gpt, dev)
    for flag, field in (
        ("temperature", "temperature"),
        ("top_k", "top_k"),
        ("top_p", "top_p"),
        ("guidance", "guidance_scale"),
    ):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(cfg.sample, field))
    tokenizer = load_tokenizer(cfg, dev, allow_stage1_mismatch=args.allow_stage1_mismatch)
    shards = list_shards(args.shards) if args.shards else shards_or_synthetic(cfg.data, "val", 0)
    loader = make_loader(
        shards, batch_size=args.num_maps, image_size=cfg.data.image_size, resampled=False, flip=False, shuffle_buffer=1
    )
    batch = next(iter(loader))
    x, s = batch["image"].to(dev), batch["label"].to(dev)
    if args.condition == "map":  # appearance-free: the semantic model's encoder sees the map only
        sem = (tokenizer.semantic_model or tokenizer.image_model).encode_semantic(s).flatten(1)
    else:
        sem, _ = tokenizer(x, s)
    n = args.samples_per_map
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    images = sample_images(  # (B*n, 3, H, W); the app (svq_fast/app) samples through the same function
        gpt,
        tokenizer,
        sem,
        samples_per_map=n,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        guidance_scale=args.guidance,
        generator=gen,
    )

    os.makedirs(args.out, exist_ok=True)
    s1 = tokenizer.semantic_model or tokenizer.image_model
    maps = colorize(s, s1.cfg.num_classes, s1.cfg.ignore_index)
    rows = []
    for i in range(x.shape[0]):
        samples = [to_unit(images[i * n + j]) for j in range(n)]
        for j, img in enumerate(samples):
            save_png(img, os.path.join(args.out, f"{batch['key'][i]}_sample{j}.png"))
        rows.append([maps[i], to_unit(x[i])] + samples)
    save_png(grid(rows), os.path.join(args.out, "grid.png"))
    with open(os.path.join(args.out, "settings.json"), "w") as f:
        json.dump(
            {**vars(args), "keys": list(batch["key"]), "columns": "semantic map | reference | samples"}, f, indent=1
        )
    print(f"wrote {x.shape[0] * n} samples and {os.path.join(args.out, 'grid.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
