"""Write WebDataset shards of (image, unified label map) pairs from a dataset on disk, or of synthetic scenes.

    python -m svq_fast.data.make_shards --dataset ade20k --root /data/ade --split train --out shards/ade/train
    python -m svq_fast.data.make_shards --dataset cityscapes --root /data/cityscapes --split val --out ...
    python -m svq_fast.data.make_shards --dataset cocostuff --root /data/cocostuff --split train --out ...
    python -m svq_fast.data.make_shards --dataset folder --root DIR_WITH_images_AND_labels --out ...
    python -m svq_fast.data.make_shards --dataset synthetic --split train --out data/synthetic/train \\
        --size 64 --num-samples 2000

Layouts are in svq_fast/data/sources.py, the label mapping in svq_fast/data/labels/, the conversion (resize,
crop, checks, balanced resumable shards, rejects.jsonl, index.json) in svq_fast/data/convert.py.
Rerunning the same command resumes: finished shards are kept. Exit status 2 when more than
--max-reject-fraction of the inputs were rejected (the message names the count and the rejects file).
Synthetic scenes are deterministic by (seed, index), so the result does not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from svq_fast.data import sources
from svq_fast.data.convert import ConvertSpec, TooManyRejects, convert
from svq_fast.data.synthetic import SyntheticSpec, render_scene

# Split offsets keep train and val scenes disjoint for the same seed.
_SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}
DATASETS = ("synthetic", *sources.DATASETS)


@dataclass(frozen=True)
class SyntheticItem:
    """Synthetic scene number `index` (global, split offset included) as a converter input."""

    id: str
    index: int
    size: int
    seed: int

    def load(self):
        image, label = render_scene(SyntheticSpec(size=self.size, seed=self.seed), self.index)
        return image, label, {"index": self.index, "size": self.size}


def synthetic_items(split: str, size: int, num_samples: int, seed: int) -> list[SyntheticItem]:
    offset = _SPLIT_OFFSET[split]
    return [SyntheticItem(f"{offset + i:09d}", offset + i, size, seed) for i in range(num_samples)]


def write_synthetic(
    out: str,
    *,
    split: str = "train",
    size: int = 64,
    num_samples: int = 1000,
    seed: int = 0,
    samples_per_shard: int = 250,
    processes: int = 0,
    progress: bool = True,
) -> dict:
    """Shards of synthetic scenes (PNG images, labels in the synthetic 16-class space). Returns the index."""
    spec = ConvertSpec(
        dataset="synthetic",
        split=split,
        label_table="synthetic",
        label_space="synthetic",
        size=size,
        crop="center",
        seed=seed,
        image_format="png",
        samples_per_shard=samples_per_shard,
        shuffle=False,
        prefix=f"synthetic-{split}",
        key_prefix="syn",
    )
    items = synthetic_items(split, size, num_samples, seed)
    return convert(
        items,
        out,
        spec,
        processes=processes,
        progress=progress,
        max_reject_fraction=0.0,
        files_of=lambda it: {"file": f"synthetic:{it.index}"},
    )


def write_dataset(
    dataset: str,
    root: str,
    out: str,
    *,
    split: str = "train",
    size: int = 256,
    crop: str = "auto",
    seed: int = 0,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    label_space: str = "unified",
    processes: int = 0,
    progress: bool = True,
    max_reject_fraction: float = 0.05,
    limit: int = 0,
) -> dict:
    """Shards of a real dataset's `split` (see sources.py for layouts). Returns the index; raises TooManyRejects."""
    items = sources.list_items(dataset, root, split)
    if limit:
        items = items[:limit]
    table = sources.LABEL_TABLE[dataset] if dataset != "folder" else label_space
    spec = ConvertSpec(
        dataset=dataset,
        split=split,
        label_table=table,
        label_space=label_space if dataset == "folder" else "unified",
        size=size,
        crop=("random" if split == "train" else "center") if crop == "auto" else crop,
        seed=seed,
        image_format=image_format,
        samples_per_shard=samples_per_shard,
        prefix=f"{dataset}-{split}",
        key_prefix=f"{dataset}-",
    )
    return convert(items, out, spec, processes=processes, progress=progress, max_reject_fraction=max_reject_fraction)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", default="", help="dataset root (not for synthetic)")
    p.add_argument("--split", default="train", choices=sorted(_SPLIT_OFFSET))
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256, help="shorter side resized to this, then a square crop")
    p.add_argument("--crop", default="auto", choices=["auto", "random", "center"], help="auto: random for train")
    p.add_argument("--num-samples", type=int, default=1000, help="synthetic: how many scenes")
    p.add_argument("--limit", type=int, default=0, help="real data: convert only the first N files (by id)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=0, help="default 250 synthetic, 1000 real data")
    p.add_argument("--image-format", default="", choices=["", "jpg", "png"], help="default png synthetic, jpg real")
    p.add_argument("--label-space", default="unified", choices=["unified", "synthetic"], help="folder labels")
    p.add_argument("--processes", type=int, default=0, help="0 = one per core (at most 8)")
    p.add_argument("--max-reject-fraction", type=float, default=0.05)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.dataset == "synthetic":
            if args.image_format == "jpg":
                p.error("synthetic shards are written as png")
            index = write_synthetic(
                args.out,
                split=args.split,
                size=args.size,
                num_samples=args.num_samples,
                seed=args.seed,
                samples_per_shard=args.samples_per_shard or 250,
                processes=args.processes,
                progress=not args.no_progress,
            )
        else:
            if not args.root:
                p.error(f"--root is required for --dataset {args.dataset}")
            index = write_dataset(
                args.dataset,
                args.root,
                args.out,
                split=args.split,
                size=args.size,
                crop=args.crop,
                seed=args.seed,
                samples_per_shard=args.samples_per_shard or 1000,
                image_format=args.image_format or "jpg",
                label_space=args.label_space,
                processes=args.processes,
                progress=not args.no_progress,
                max_reject_fraction=args.max_reject_fraction,
                limit=args.limit,
            )
    except TooManyRejects as e:
        print(f"make_shards: FAILED: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {index['num_samples']} samples in {len(index['shards'])} shards to {args.out} "
        f"({index['num_rejected']} rejected, {index['shards_reused']} shards reused from an earlier run)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
