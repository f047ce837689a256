"""Write WebDataset shards from a dataset source.

    python -m svq_fast.data.make_shards --dataset synthetic --split train --out data/synthetic/train \
        --size 64 --num-samples 2000

Synthetic scenes are generated in parallel processes (deterministic by seed and index, so the result does
not depend on the number of processes).
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from svq_fast.data.shards import ShardWriter
from svq_fast.data.synthetic import CLASS_NAMES, SyntheticSpec, render_scene

# Split offsets keep train and val scenes disjoint for the same seed.
_SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}


def _render(args):
    spec, index = args
    return index, render_scene(spec, index)


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
    spec = SyntheticSpec(size=size, seed=seed)
    offset = _SPLIT_OFFSET[split]
    jobs = [(spec, offset + i) for i in range(num_samples)]
    processes = processes or min(4, os.cpu_count() or 1)
    with ShardWriter(out, prefix=f"synthetic-{split}", samples_per_shard=samples_per_shard) as writer:
        with ProcessPoolExecutor(processes) as pool:
            it = pool.map(_render, jobs, chunksize=32)
            for index, (image, label) in tqdm(
                it, total=num_samples, disable=not progress, desc=f"synthetic {split}"
            ):
                writer.write(
                    f"syn{index:09d}", image, label, {"dataset": "synthetic", "index": index, "size": size}
                )
        index = writer.close(
            {
                "dataset": "synthetic",
                "split": split,
                "seed": seed,
                "image_size": size,
                "class_names": list(CLASS_NAMES),
            }
        )
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["synthetic"])
    p.add_argument("--split", default="train", choices=sorted(_SPLIT_OFFSET))
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--processes", type=int, default=0)
    args = p.parse_args(argv)
    index = write_synthetic(
        args.out,
        split=args.split,
        size=args.size,
        num_samples=args.num_samples,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        processes=args.processes,
    )
    print(f"wrote {index['num_samples']} samples in {len(index['shards'])} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
