"""How much semantic mIoU can a codebook of K codes keep at a given downsampling factor?

An sVQ model codes every f x f patch of the semantic map with one of K semantic codes. This experiment quantizes
the training shards' label patches directly: weighted k-means over the distinct patches in one-hot space (squared
distance = Hamming distance between label patches), initialised with the K most frequent patches; each held-out
patch is then decoded as its nearest pattern's per-pixel majority class. The resulting mIoU is the ceiling of
coding each patch on its own with K patterns. A trained model's semantic decoder also sees the neighbouring codes
and may beat it somewhat, but a codebook far below the target here will not reach the target by training longer.
Memory: the patterns take K * f^2 * (classes + 1) floats (1 GB for K = 4096 at f = 16 with 243 classes);
distances are computed in blocks of 256 MB.

    python recipes/experiments/semantic_codebook_bound.py --train-shards runs/demo/data/64px/train \\
        --val-shards runs/demo/data/64px/val --factor 4 --codes 256,1024,4096 --out runs/codebook_bound

Writes <out>/bound.json and <out>/bound.md (per-K mIoU, pixel accuracy and per-class IoU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from svq_fast.data.loader import IGNORE, list_shards, ordered_loader, read_index
from svq_fast.eval.miou import ConfusionMatrix

BLOCK_VALUES = 1 << 26  # gathered (patches, f*f, K) values per distance block: 256 MB of fp32


def label_patches(shards: list[str], image_size: int, factor: int, max_images: int) -> torch.Tensor:
    """(N, factor*factor) uint8 label patches of the first max_images center-cropped maps, in shard order."""
    loader = ordered_loader(shards, batch_size=64, image_size=image_size)
    out, seen = [], 0
    for batch in loader:
        labels = batch["label"][~batch["pad"]][: max_images - seen]  # (B, H, W)
        seen += len(labels)
        out.append(labels.unfold(1, factor, factor).unfold(2, factor, factor).reshape(-1, factor * factor))
        if seen >= max_images:
            break
    return torch.cat(out).to(torch.uint8)


class PatchCodebook:
    """K patterns, each a (P, C + 1) per-pixel class distribution (the last class stands for ignore pixels)."""

    def __init__(self, patches: torch.Tensor, counts: torch.Tensor, num_classes: int, k: int):
        self.c = num_classes + 1
        order = counts.argsort(descending=True)[:k]  # the k most frequent patches start as the patterns
        n = len(order)
        self.centroids = self._one_hot_mean(patches[order], torch.ones(n), torch.arange(n), n)

    def _class_ids(self, patches: torch.Tensor) -> torch.Tensor:
        ids = patches.long()
        return torch.where(ids == IGNORE, torch.full_like(ids, self.c - 1), ids.clamp_max(self.c - 2))

    def _one_hot_mean(self, patches, weights, assign, k) -> torch.Tensor:
        """(k, P, C+1): the weighted mean one-hot of the patches assigned to each code (empty codes: zeros)."""
        n, p = patches.shape
        sums = torch.zeros(k, p, self.c, dtype=torch.float64)
        idx = (assign[:, None].expand(n, p), torch.arange(p).expand(n, p), self._class_ids(patches))
        sums.index_put_(idx, weights.double()[:, None].expand(n, p), accumulate=True)
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, weights.double())
        return (sums / total.clamp_min(1e-12)[:, None, None]).float()

    def assign(self, patches: torch.Tensor) -> torch.Tensor:
        """(N,) nearest code per patch: ||onehot - c||^2 = P - 2 <onehot, c> + ||c||^2."""
        cent = self.centroids.permute(1, 2, 0)  # (P, C+1, K)
        norms = self.centroids.pow(2).sum((1, 2))  # (K,)
        p_idx = torch.arange(patches.shape[1])
        out = []
        rows = max(1, BLOCK_VALUES // (patches.shape[1] * len(self.centroids)))
        for chunk in patches.split(rows):
            dot = cent[p_idx, self._class_ids(chunk)].sum(1)  # (n, K)
            out.append((norms - 2 * dot).argmin(1))
        return torch.cat(out)

    def fit(self, patches: torch.Tensor, counts: torch.Tensor, iters: int) -> None:
        for _ in range(iters):
            assign = self.assign(patches)
            new = self._one_hot_mean(patches, counts.float(), assign, len(self.centroids))
            used = torch.zeros(len(self.centroids), dtype=torch.bool)
            used[assign] = True
            self.centroids[used] = new[used]  # a code nothing chose keeps its pattern

    def decode(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, P) per-pixel majority class of each patch's code (ignore-class pixels never win)."""
        return self.centroids[self.assign(patches), :, :-1].argmax(-1)


def bound(train: torch.Tensor, val: torch.Tensor, num_classes: int, k: int, iters: int) -> dict:
    uniq, counts = torch.unique(train, dim=0, return_counts=True)
    book = PatchCodebook(uniq, counts, num_classes, k)
    book.fit(uniq, counts, iters)
    cm = ConfusionMatrix(num_classes, IGNORE)  # the same mIoU as recipes/evaluate.py's Table 3
    cm.update(book.decode(val), val.long())
    return {
        "codes": k,
        "distinct_train_patches": len(uniq),
        "miou": cm.miou(),
        "pixel_accuracy": cm.pixel_accuracy(),
        "per_class_iou": [None if math.isnan(v) else round(v, 4) for v in cm.iou().tolist()],
    }


def write_report(out: str, results: list[dict], meta: dict, names: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bound.json"), "w") as f:
        json.dump({**meta, "results": results}, f, indent=1)
    lines = [
        f"# Semantic codebook bound: {meta['factor']}x{meta['factor']} label patches, {meta['train_images']} "
        f"training / {meta['val_images']} held-out maps",
        "",
        f"`{meta['command']}` ({meta['seconds']:.0f} s)",
        "",
        "mIoU of the held-out maps when every patch is replaced by the majority classes of its nearest of K patterns "
        "(k-means over the training patches). A model that codes each patch alone cannot do better; one whose "
        "decoder sees neighbouring codes can exceed it a little.",
        "",
        "| codes K | mIoU (%) | pixel acc. (%) | " + " | ".join(names) + " |",
        "|---" * (3 + len(names)) + "|",
    ]
    for r in results:
        cells = ["n/a" if v is None else f"{v:.2f}" for v in r["per_class_iou"]]
        head = f"| {r['codes']} | {100 * r['miou']:.2f} | {100 * r['pixel_accuracy']:.2f} | "
        lines.append(head + " | ".join(cells) + " |")
    with open(os.path.join(out, "bound.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-shards", required=True)
    p.add_argument("--val-shards", required=True)
    p.add_argument("--factor", type=int, default=4, help="downsampling factor: patch side in pixels")
    p.add_argument("--codes", default="256,1024,4096", help="comma-separated codebook sizes")
    p.add_argument("--image-size", type=int, default=0, help="crop size (default: the shards' index image_size)")
    p.add_argument("--max-train-images", type=int, default=1500)
    p.add_argument("--max-val-images", type=int, default=256)
    p.add_argument("--iters", type=int, default=15, help="k-means iterations")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    train_shards, val_shards = list_shards(args.train_shards), list_shards(args.val_shards)
    index = read_index(os.path.dirname(os.path.abspath(train_shards[0])))
    num_classes, names = int(index["num_classes"]), list(index.get("class_names") or [])
    size = args.image_size or int(index["image_size"])
    if size % args.factor:
        raise SystemExit(f"--factor {args.factor} does not divide the image size {size}")
    start = time.time()
    train = label_patches(train_shards, size, args.factor, args.max_train_images)
    val = label_patches(val_shards, size, args.factor, args.max_val_images)
    codes = [int(k) for k in args.codes.split(",")]
    results = [bound(train, val, num_classes, k, args.iters) for k in tqdm(codes, desc="codebook sizes")]
    meta = {
        "factor": args.factor,
        "train_images": len(train) * args.factor**2 // size**2,
        "val_images": len(val) * args.factor**2 // size**2,
        "iters": args.iters,
        "seconds": time.time() - start,
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
    }
    write_report(args.out, results, meta, names or [str(i) for i in range(num_classes)])
    for r in results:
        print(f"K={r['codes']}: mIoU {100 * r['miou']:.2f}%  pixel accuracy {100 * r['pixel_accuracy']:.2f}%")
    return {**meta, "results": results}


if __name__ == "__main__":
    main()
