"""Sample images from semantic maps with a trained GPT (+ its stage-1 model).

    python recipes/sample.py --gpt runs/demo/stage2/export --out runs/demo/samples --num-maps 6 --samples-per-map 3
    python recipes/sample.py --gpt runs/demo/stage2/export --out runs/my_samples --maps my_maps/ --samples-per-map 2

Maps from held-out shards (the default; --shards, default: the synthetic val split). --condition reference encodes
z_s from (reference image, map) as in the paper; --condition map encodes it from the map alone (`encode_semantic`,
as the synthesis page does), so no appearance of the reference leaks into the samples; default: the condition the
GPT was trained on (its config's `condition`).
Writes grid.png (rows: semantic map | reference | samples), one PNG per sample, and settings.json.

Maps from files (--maps PATH: a label PNG, a folder of them or a .txt list; svq_fast/data/label_files.py reads
them): 8-bit class ids of the model's label space (mode L or P; --label-space names the space the files are in,
checked against the model's), an RGB PNG in its palette, or a dataset's own ids (--from-dataset ade20k, ...: the
table make_shards converts that dataset with; the model must be in the unified space). Files have no reference
image: z_s always comes from the map alone. Any size whose sides are multiples of the stage-1 downsampling factor
and at least the training size: larger or non-square maps are encoded whole (the stage-1 models' mid attention
blocks then attend over the whole larger latent grid) and their image tokens sampled by a sliding window of the
GPT's grid (svq_fast/eval/sliding_window.py; --window-stride; benchmarks/results/sampling_any_size_cpu/). Maps of
one size are batched (--batch-size maps at a time, each batch's generator seeded with --seed + its number).
Writes one folder per map (sample{j}.png, map.png: the map as read in the palette, understood.png: the semantic
decoder's reading of z_s, the map the GPT was conditioned on, settings.json) and grid_<H>x<W>.png per size (rows:
map | understood | samples). A file that cannot be used is reported with the reason and skipped; the exit status
is 1 if any map failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np
import torch
from tqdm import tqdm

from svq_fast.data import labels
from svq_fast.data.label_files import DATASETS, LabelFileError, list_label_files, read_label_file, space_spec
from svq_fast.data.loader import list_shards, make_loader
from svq_fast.data.run_shards import shards_or_synthetic
from svq_fast.eval.sampling import sample_images
from svq_fast.eval.visualize import colorize, grid, save_png, to_unit
from svq_fast.export import load_gpt, load_tokenizer

CONDITIONS = ("reference", "map")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", required=True, help="stage-2 export directory (model.safetensors + config.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", default="", help="held-out shards (default: synthetic val split)")
    p.add_argument("--num-maps", type=int, default=6, help="maps read from the shards")
    p.add_argument("--samples-per-map", type=int, default=3)
    f = p.add_argument_group("maps from files")
    f.add_argument("--maps", default="", help="a label PNG, a folder of them or a .txt list (instead of --shards)")
    f.add_argument(
        "--label-space", default="", help="the files' label space (unified, synthetic); default: the model's"
    )
    f.add_argument("--from-dataset", default="", choices=("",) + DATASETS, help="files hold this dataset's own ids")
    f.add_argument("--batch-size", type=int, default=4, help="maps sampled at once (maps of one size)")
    f.add_argument("--window-stride", type=int, default=None, help="sliding-window stride in latents (default grid//2)")
    g = p.add_argument_group("sampling (defaults: the GPT config's sample section)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--condition",
        choices=CONDITIONS,
        default=None,
        help="z_s from (reference image, map) as in the paper, or from the map alone (encode_semantic); default: "
        "the GPT's own (its config's condition); --maps: always the map alone",
    )
    p.add_argument(
        "--allow-stage1-mismatch",
        action="store_true",
        help="use the stage-1 export even if its weights differ from the ones the GPT was trained on",
    )
    args = p.parse_args(argv)
    if args.maps and args.shards:
        p.error("--maps and --shards are two sources of maps: give one")
    if (args.label_space or args.from_dataset) and not args.maps:
        p.error("--label-space / --from-dataset describe files: use them with --maps")
    if args.label_space and args.from_dataset:
        p.error("--from-dataset remaps a dataset's ids to the unified space: --label-space does not apply")
    if args.batch_size < 1 or args.samples_per_map < 1:
        p.error("--batch-size and --samples-per-map must be >= 1")
    return args


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, guidance_scale=args.guidance)


def from_shards(args, gpt, cfg, tokenizer, dev) -> int:
    shards = list_shards(args.shards) if args.shards else shards_or_synthetic(cfg.data, "val", 0)
    loader = make_loader(
        shards, batch_size=args.num_maps, image_size=cfg.data.image_size, resampled=False, flip=False, shuffle_buffer=1
    )
    batch = next(iter(loader))
    x, s = batch["image"].to(dev), batch["label"].to(dev)
    sem = tokenizer.semantic_tokens(x, s, args.condition)  # (B, P)
    n = args.samples_per_map
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    images = sample_images(gpt, tokenizer, sem, samples_per_map=n, generator=gen, **sampling_kwargs(args))

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


def _folder_names(paths: list[str]) -> list[str]:
    """One output folder per map: the file's stem (characters other than [A-Za-z0-9_.-] made _), _2, _3 on repeats."""
    seen: dict[str, int] = {}
    out = []
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(path))[0]) or "map"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def from_files(args, gpt, cfg, tokenizer, dev) -> int:
    s1 = tokenizer.semantic_model or tokenizer.image_model
    m = s1.cfg
    spec = space_spec(
        m.num_classes, from_dataset=args.from_dataset, factor=m.downsampling, min_size=cfg.data.image_size
    )
    if args.from_dataset and spec.space != "unified":
        sys.exit(
            f"--from-dataset {args.from_dataset} remaps to the unified label space ({labels.NUM_CLASSES} classes); "
            f"this model's space is {spec.space} ({m.num_classes} classes)"
        )
    if args.label_space and args.label_space != spec.space:
        sys.exit(
            f"--label-space {args.label_space}: this model's label space is {spec.space} ({m.num_classes} classes)"
        )
    try:
        paths = list_label_files(args.maps)
    except LabelFileError as e:
        sys.exit(f"--maps: {e}")
    names = _folder_names(paths)
    failed: dict[str, str] = {}
    maps: dict[tuple[int, int], list[tuple[str, str, np.ndarray]]] = {}  # (H, W) -> [(path, folder, label)]
    for path, name in zip(paths, names):
        try:
            label = read_label_file(path, spec)
        except LabelFileError as e:
            failed[path] = str(e)
            print(f"error: {e}", file=sys.stderr)
            continue
        maps.setdefault(label.shape, []).append((path, name, label))

    f = m.downsampling
    n = args.samples_per_map
    batches = [
        (hw, group[k : k + args.batch_size])
        for hw, group in maps.items()
        for k in range(0, len(group), args.batch_size)
    ]
    total = sum(len(b) * (hw[0] // f) * (hw[1] // f) for hw, b in batches)
    bar = tqdm(total=total, unit="token", desc=f"{sum(len(v) for v in maps.values())} maps x {n} samples")
    os.makedirs(args.out, exist_ok=True)
    grids: dict[tuple[int, int], list] = {}
    for number, ((h, w), batch) in enumerate(batches):
        shape, count = (h // f, w // f), len(batch)
        try:
            s = torch.from_numpy(np.stack([lab for _, _, lab in batch]).astype(np.int64)).to(dev)  # (B, H, W)
            sem = tokenizer.semantic_tokens(None, s, "map")  # (B, h*w): no reference image
            z_s = s1.quantizer_s.lookup(sem.view(-1, *shape))
            understood = s1.semantic_labels(s1.decode_semantic(z_s))  # (B, H, W)
            gen = torch.Generator(device=dev).manual_seed(args.seed + number)
            images = sample_images(
                gpt,
                tokenizer,
                sem,
                samples_per_map=n,
                generator=gen,
                progress=lambda done, all_, k=count: bar.update(k),
                latent_shape=shape,
                window_stride=args.window_stride,
                **sampling_kwargs(args),
            )  # (B * n, 3, H, W)
        except Exception as e:  # one batch failing (memory, a broken model) must not lose the others
            for path, _, _ in batch:
                failed[path] = f"{path}: sampling failed ({type(e).__name__}: {e})"
            print(f"error: sampling batch {number} ({len(batch)} maps of {h}x{w}) failed: {e}", file=sys.stderr)
            continue
        shown = colorize(s, m.num_classes, m.ignore_index)
        seen = colorize(understood, m.num_classes, m.ignore_index)
        for i, (path, name, label) in enumerate(batch):
            folder = os.path.join(args.out, name)
            os.makedirs(folder, exist_ok=True)
            samples = [to_unit(images[i * n + j]) for j in range(n)]
            for j, img in enumerate(samples):
                save_png(img, os.path.join(folder, f"sample{j}.png"))
            save_png(shown[i], os.path.join(folder, "map.png"))
            save_png(seen[i], os.path.join(folder, "understood.png"))
            labeled = label != m.ignore_index
            agree = understood[i].cpu().numpy()[labeled] == label[labeled]
            with open(os.path.join(folder, "settings.json"), "w") as fh:
                json.dump(
                    {
                        "map": os.path.abspath(path),
                        "size": [h, w],
                        "latent_grid": list(shape),
                        "gpt_grid": gpt.cfg.grid,
                        "sliding_window": shape != (gpt.cfg.grid, gpt.cfg.grid),
                        "window_stride": args.window_stride or max(1, gpt.cfg.grid // 2),
                        "condition": "map",
                        "from_dataset": args.from_dataset,
                        "understood_agreement": float(agree.mean()),
                        "gpt": os.path.abspath(args.gpt),
                        "seed": args.seed,
                        "batch": number,
                        "batch_maps": [os.path.abspath(p) for p, _, _ in batch],
                        **{k: v for k, v in sampling_kwargs(args).items()},
                        "samples": n,
                    },
                    fh,
                    indent=1,
                )
            grids.setdefault((h, w), []).append([shown[i], seen[i]] + samples)
    bar.close()
    for (h, w), rows in grids.items():
        save_png(grid(rows), os.path.join(args.out, f"grid_{h}x{w}.png"))
    done = sum(len(r) for r in grids.values())
    print(f"wrote {done * n} samples of {done} maps to {args.out}" + (f"; {len(failed)} failed" if failed else ""))
    with open(os.path.join(args.out, "failed.json"), "w") as fh:
        json.dump(failed, fh, indent=1)
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
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
    args.condition = args.condition or cfg.condition  # what the GPT was trained on
    tokenizer = load_tokenizer(cfg, dev, allow_stage1_mismatch=args.allow_stage1_mismatch)
    return (from_files if args.maps else from_shards)(args, gpt, cfg, tokenizer, dev)


if __name__ == "__main__":
    sys.exit(main())
