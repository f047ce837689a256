"""Evaluate a stage-1 model (reconstruction: the paper's Tables 2 and 3) or a stage-2 GPT (generation: Table 1).

    python recipes/evaluate.py --mode stage1 --stage1 runs/svqgan_tiny/export --out runs/eval/stage1 \\
        --vgg-weights vgg16-397923af.pth --inception-weights pt_inception-2015-12-05-6726825d.pth \\
        --segmenter runs/segmenter
    python recipes/evaluate.py --mode stage2 --gpt runs/gpt_tiny/export --out runs/eval/stage2 \\
        --temperature 1.0 --top-k 0 --top-p 1.0 --guidance 1.0 --seed 0 --segmenter runs/segmenter ...
    accelerate launch --multi_gpu --num_processes 2 recipes/evaluate.py ...   # several ranks (CPU or GPU)

Data: held-out shards (--shards; default: the synthetic val split of the model's data config), read once each,
center-cropped, unflipped, in shard-list order; --max-samples N evaluates the first N of that order. Batches of
that one sequence are split over ranks with accelerate's split_between_processes (see Ranks); every metric is a
streaming state (svq_fast.eval.metrics) summed or merged over ranks at the end, so the result does not depend on
the number of ranks (stage 2 seeds each batch's sampling by (seed, batch number): same samples for any rank count
at a fixed --batch-size).

Every generated or reconstructed image is rounded to 8 bits (as saved PNGs) before any metric.
Metrics:
- stage1: SSIM, PSNR (torchmetrics), LPIPS (--vgg-weights), FID vs the real images (--inception-weights),
  semantic reconstruction mIoU and pixel accuracy (argmax of the semantic decoder, per class and mean),
  codebook usage (fraction of codes used, perplexity) of both codebooks; with --segmenter also FSD (Frechet
  distance in the segmenter's feature space) and the segmenter's mIoU on reconstructions and on real images.
- stage2: one sample per held-out map with the given temperature / top-k / top-p / guidance, FID and FSD of the
  samples vs the real images, SSIM / PSNR / LPIPS between each sample and the real image of its map, the
  segmenter's mIoU on the samples (and on the real images, its reference) and the usage of generated codes.
Metrics whose network was not given are reported as "n/a (no weights)".
The real images' FID / FSD statistics are cached (--stats-cache) per shard list, network and sample count.

Writes <out>/metrics.json and <out>/metrics.md (the paper's table layout, then the other numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from svq_fast.data.loader import list_shards, make_loader
from svq_fast.eval.fid import (
    InceptionFeatures,
    file_sha256,
    frechet_distance_of,
    load_stats,
    save_stats,
    stats_cache_path,
    stats_key,
)
from svq_fast.eval.image_metrics import LPIPSMetric, psnr, quantize_uint8, ssim
from svq_fast.eval.metrics import (
    CodebookUsage,
    FeatureStats,
    MeanStat,
    all_reduce_confusion,
    dist_ready,
    per_class_stats,
)
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.eval.sampling import sample_image_tokens
from svq_fast.models.segmenter import load_segmenter
from svq_fast.train.data import resolve_shards
from svq_fast.train.pretrained import load_gpt, load_stage1
from svq_fast.train.stage2 import build_tokenizer

NA_WEIGHTS = "n/a (no weights)"
STATS_VERSION = 1  # bump when the real-image preprocessing changes (invalidates cached statistics)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("stage1", "stage2"), required=True)
    p.add_argument("--stage1", default="", help="stage-1 export (stage1 mode; in stage2 mode overrides the GPT's)")
    p.add_argument("--gpt", default="", help="stage-2 export directory (stage2 mode)")
    p.add_argument("--out", required=True, help="output directory for metrics.json and metrics.md")
    p.add_argument("--shards", default="", help="held-out shards (default: the model config's synthetic val split)")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate the first N samples (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--name", default="", help="model name in the tables (default: the export's run name)")
    p.add_argument("--vgg-weights", default="", help="torchvision vgg16-397923af.pth (LPIPS backbone)")
    p.add_argument("--inception-weights", default="", help="pytorch-fid pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--segmenter", default="", help="segmenter directory from recipes/train_segmenter.py")
    p.add_argument(
        "--stats-cache",
        default=os.path.join(os.path.expanduser("~"), ".cache", "svq_fast", "eval_stats"),
        help="directory for cached real-image feature statistics ('none' to disable)",
    )
    g = p.add_argument_group("stage2 sampling (defaults: the GPT config's sample section)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--semantic-tokens",
        choices=("reference", "map-only"),
        default="reference",
        help="z_s from (real image, map) as in the paper, or from the map alone (coupled models)",
    )
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    args = p.parse_args(argv)
    if args.mode == "stage1" and not args.stage1:
        p.error("--mode stage1 needs --stage1 EXPORT_DIR")
    if args.mode == "stage2" and not args.gpt:
        p.error("--mode stage2 needs --gpt EXPORT_DIR")
    return args


class Scorer:
    """The metric networks that were given and the streaming states of one evaluation."""

    def __init__(self, args, dev, num_classes: int, ignore_index: int):
        self.dev = dev
        self.lpips = LPIPSMetric(args.vgg_weights).to(dev) if args.vgg_weights else None
        self.inception = InceptionFeatures(args.inception_weights).to(dev) if args.inception_weights else None
        self.segmenter, self.segmenter_meta = (None, {})
        if args.segmenter:
            self.segmenter, self.segmenter_meta = load_segmenter(args.segmenter, dev)
            if self.segmenter.cfg.num_classes != num_classes:
                raise ValueError(
                    f"segmenter {args.segmenter} predicts {self.segmenter.cfg.num_classes} classes, the model "
                    f"{num_classes}: train one on the same label space (train_segmenter.py --num-classes)"
                )
            self.segmenter_sha = file_sha256(os.path.join(args.segmenter, "model.safetensors"))
        self.ssim, self.psnr, self.lpips_stat = MeanStat(), MeanStat(), MeanStat()
        self.fid_fake = FeatureStats(2048) if self.inception else None
        self.fid_real = FeatureStats(2048) if self.inception else None
        d = self.segmenter.feature_dim if self.segmenter else 0
        self.fsd_fake = FeatureStats(d) if self.segmenter else None
        self.fsd_real = FeatureStats(d) if self.segmenter else None
        self.seg_fake = ConfusionMatrix(num_classes, ignore_index)
        self.seg_real = ConfusionMatrix(num_classes, ignore_index)
        self.real_cached = {"fid": False, "fsd": False}

    def use_cache(self, cache_dir: str, shards: list[str], settings: dict) -> dict[str, tuple[str, str]]:
        """Load cached real statistics where present; returns {name: (path, key)} of those still to compute."""
        todo = {}
        if not cache_dir or cache_dir.lower() == "none":
            return todo
        for name, net_id, stats_attr in (
            ("fid", self.inception.network_id if self.inception else None, "fid_real"),
            ("fsd", f"svq_fast-segmenter-sha256:{self.segmenter_sha}" if self.segmenter else None, "fsd_real"),
        ):
            if net_id is None:
                continue
            key = stats_key(shards, net_id, version=STATS_VERSION, **settings)
            path = stats_cache_path(cache_dir, key, name)
            cached = load_stats(path, key)
            if cached is not None:
                setattr(self, stats_attr, cached)
                self.real_cached[name] = True
            else:
                todo[name] = (path, key)
        return todo

    @torch.no_grad()
    def update(self, fake: torch.Tensor, real: torch.Tensor, label: torch.Tensor) -> None:
        """fake, real (B, 3, H, W) in [-1, 1] on the 8-bit grid; label (B, H, W): the map both belong to."""
        self.ssim.update(ssim(fake, real))
        self.psnr.update(psnr(fake, real))
        if self.lpips is not None:
            self.lpips_stat.update(self.lpips(fake, real))
        if self.inception is not None:
            self.fid_fake.update(self.inception(fake))
            if not self.real_cached["fid"]:
                self.fid_real.update(self.inception(real))
        if self.segmenter is not None:
            logits, feats = self.segmenter.forward_features(fake)
            self.fsd_fake.update(feats)
            self.seg_fake.update(logits.argmax(1), label)
            logits_r, feats_r = self.segmenter.forward_features(real)
            if not self.real_cached["fsd"]:
                self.fsd_real.update(feats_r)
            self.seg_real.update(logits_r.argmax(1), label)

    def all_reduce(self) -> None:
        """Collective: every rank calls it, in this order."""
        for st in (self.ssim, self.psnr, self.lpips_stat):
            st.all_reduce()
        for name, fake, real in (("fid", self.fid_fake, self.fid_real), ("fsd", self.fsd_fake, self.fsd_real)):
            if fake is not None:
                fake.all_reduce()
                if not self.real_cached[name]:
                    real.all_reduce()
        all_reduce_confusion(self.seg_fake)
        all_reduce_confusion(self.seg_real)

    def results(self, fake_name: str) -> dict:
        def frechet(fake, real):
            if fake.n < 2 or real.n < 2:
                return "n/a (fewer than 2 samples)"
            return frechet_distance_of(fake, real)

        out = {
            "ssim": self.ssim.mean(),
            "ssim_std": self.ssim.std(),
            "psnr_db": self.psnr.mean(),
            "lpips": self.lpips_stat.mean() if self.lpips is not None else NA_WEIGHTS,
            "fid": frechet(self.fid_fake, self.fid_real) if self.inception is not None else NA_WEIGHTS,
            "fsd": frechet(self.fsd_fake, self.fsd_real) if self.segmenter is not None else NA_WEIGHTS,
            f"segmenter_miou_{fake_name}": self.seg_fake.miou() if self.segmenter is not None else NA_WEIGHTS,
            "segmenter_miou_real": self.seg_real.miou() if self.segmenter is not None else NA_WEIGHTS,
            "images_scored": self.ssim.count,
        }
        if self.inception is not None:
            out["fid_samples"] = {
                "fake": self.fid_fake.n,
                "real": self.fid_real.n,
                "real_cached": self.real_cached["fid"],
            }
        if self.segmenter is not None:
            out["fsd_samples"] = {
                "fake": self.fsd_fake.n,
                "real": self.fsd_real.n,
                "real_cached": self.real_cached["fsd"],
            }
        return out


def class_names(num_classes: int) -> list[str]:
    from svq_fast.data.labels import get_space

    for space in ("synthetic", "unified"):
        s = get_space(space)
        if s.num_classes == num_classes:
            return list(s.names)
    return [f"class_{i}" for i in range(num_classes)]


def _eval_loader(shards, args, image_size):
    return make_loader(
        shards,
        batch_size=args.batch_size,
        image_size=image_size,
        rank=0,
        world_size=1,  # one global sequence; ranks take contiguous runs of its batches (split_between_processes)
        num_workers=args.num_workers,
        resampled=False,
        flip=False,
        shuffle=False,
        shuffle_buffer=args.batch_size,
        crop="center",
    )


def split_contiguous(items: list, rank: int, world: int) -> list:
    """accelerate's split_between_processes arithmetic: contiguous runs, the first len % world ranks get one more."""
    per, extra = divmod(len(items), world)
    lo = rank * per + min(rank, extra)
    return items[lo : lo + per + (1 if rank < extra else 0)]


class Ranks:
    """This process's rank and the world size, taken from torch.distributed when a process group exists.

    Work is split with accelerate's split_between_processes when the Accelerator sees the same world. It does not
    always: with accelerate 1.15 on CPU, `accelerate launch --multi_gpu --num_processes 2` sets up a 2-rank gloo
    group while Accelerator() reports DistributedType.NO, num_processes 1 and is_main_process on every rank; trusting
    it would make every rank score every sample and the metrics' all_reduce count each twice. Then the same
    contiguous split is applied to torch.distributed's rank and world."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        if dist_ready():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.consistent = (accelerator.process_index, accelerator.num_processes) == (self.rank, self.world)
        if not self.consistent and self.rank == 0:
            print(
                f"evaluate: torch.distributed has {self.world} ranks but the Accelerator sees "
                f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}); "
                "splitting the work by torch.distributed's ranks",
                flush=True,
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, items: list) -> list:
        if self.consistent:
            with self.accelerator.split_between_processes(items) as mine:
                return list(mine)
        return split_contiguous(items, self.rank, self.world)

    def barrier(self) -> None:
        if dist_ready():
            torch.distributed.barrier()


def _my_batches(loader, ranks, num_samples: int, batch_size: int):
    """Yield (global batch number, batch restricted to the samples that count) for this rank's share."""
    mine = ranks.split(list(range(-(-num_samples // batch_size))))
    if not mine:
        return
    state = loader.state_dict()
    state["batches"] = mine[0]  # exact resume: skips the earlier batches without decoding them
    loader.load_state_dict(state)
    for b, batch in zip(mine, loader):
        pos = torch.arange(b * batch_size, b * batch_size + batch["pad"].shape[0])
        keep = ~batch["pad"] & (pos < num_samples)
        if keep.any():
            yield (
                b,
                {k: (v[keep] if torch.is_tensor(v) else [x for x, k_ in zip(v, keep) if k_]) for k, v in batch.items()},
            )


class Stage1Task:
    """Reconstruction: x_hat and s_hat of each held-out (x, s) pair."""

    fake_name = "recon"

    def __init__(self, args, ranks, dev):
        self.model, cfg = load_stage1(args.stage1, dev)
        m = cfg.model
        self.run_name, self.image_size = cfg.run.name, m.image_size
        self.num_classes, self.ignore_index = m.num_classes, m.ignore_index
        self.has_image, self.has_semantic = self.model.has_image, self.model.has_semantic
        self.shards = list_shards(args.shards) if args.shards else resolve_shards(cfg.data, "val", ranks.rank)
        self.semantic = ConfusionMatrix(m.num_classes, m.ignore_index)
        # coupled models: the semantic map reconstructed from z_s encoded without the reference image
        self.coupled = m.kind == "svq"
        self.semantic_map_only = ConfusionMatrix(m.num_classes, m.ignore_index) if self.coupled else None
        self.image_dropout = m.image_dropout
        q = cfg.quantizer
        self.usage_x = CodebookUsage(q.image_codebook_size) if self.has_image else None
        self.usage_s = CodebookUsage(q.semantic_codebook_size) if self.has_semantic else None
        self.settings = {"export": os.path.abspath(args.stage1)}

    def step(self, b: int, x: torch.Tensor, s: torch.Tensor, scorer: Scorer) -> None:
        out = self.model(x if self.has_image else None, s if self.has_semantic else None)
        if self.has_image:
            scorer.update(quantize_uint8(out["x_hat"]), x, s)
            self.usage_x.update(out["indices_x"])
        if self.has_semantic:
            self.semantic.update(self.model.semantic_labels(out["s_logits"]), s)
            self.usage_s.update(out["indices_s"])
        if self.coupled:
            z_s = self.model.quantizer_s.lookup(self.model.encode_semantic(s))
            self.semantic_map_only.update(self.model.semantic_labels(self.model.decode_semantic(z_s)), s)

    def finish(self) -> dict:
        """Collective: the task's own global metrics."""
        all_reduce_confusion(self.semantic)
        if self.coupled:
            all_reduce_confusion(self.semantic_map_only)
        for u in (self.usage_x, self.usage_s):
            if u is not None:
                u.all_reduce()
        no_sem = "n/a (model has no semantic decoder)"
        return {
            "semantic_miou": self.semantic.miou() if self.has_semantic else no_sem,
            "semantic_pixel_acc": self.semantic.pixel_accuracy() if self.has_semantic else no_sem,
            # z_s from the map alone (image input = the learned fill, or zeros when trained without image dropout)
            "semantic_miou_map_only": self.semantic_map_only.miou() if self.coupled else "n/a (not a coupled model)",
            "image_dropout": self.image_dropout,
            "codebook": {
                "image": self.usage_x.summary() if self.usage_x is not None else "n/a (no image codebook)",
                "semantic": self.usage_s.summary() if self.usage_s is not None else "n/a (no semantic codebook)",
            },
        }

    def per_class_columns(self) -> dict[str, ConfusionMatrix]:
        return {"semantic_iou": self.semantic} if self.has_semantic else {}


class Stage2Task:
    """Generation: one sample per held-out map; the real image of that map is the reference."""

    fake_name = "generated"
    has_image = True

    def __init__(self, args, ranks, dev):
        self.gpt, cfg = load_gpt(args.gpt, dev)
        if args.stage1:
            cfg.stage1 = args.stage1
        self.tokenizer = build_tokenizer(cfg, dev)
        if args.semantic_tokens == "map-only" and self.tokenizer.semantic_model is not None:
            raise ValueError(
                "--semantic-tokens map-only needs a coupled (sVQ) stage-1 model; this GPT uses a separate one"
            )
        m = (self.tokenizer.semantic_model or self.tokenizer.image_model).cfg
        self.run_name, self.num_classes, self.ignore_index = cfg.run.name, m.num_classes, m.ignore_index
        self.image_size, self.grid, self.dev = cfg.data.image_size, cfg.model.grid, dev
        self.shards = list_shards(args.shards) if args.shards else resolve_shards(cfg.data, "val", ranks.rank)
        sample = cfg.sample
        self.sampling = {
            "temperature": sample.temperature if args.temperature is None else args.temperature,
            "top_k": sample.top_k if args.top_k is None else args.top_k,
            "top_p": sample.top_p if args.top_p is None else args.top_p,
            "guidance_scale": sample.guidance_scale if args.guidance is None else args.guidance,
        }
        self.seed, self.semantic_tokens = args.seed, args.semantic_tokens
        self.usage_gen = CodebookUsage(self.tokenizer.image_vocab)
        self.usage_sem = CodebookUsage(self.tokenizer.semantic_vocab)
        self.settings = {
            "export": os.path.abspath(args.gpt),
            "stage1": os.path.abspath(cfg.stage1),
            "sampling": {**self.sampling, "seed": args.seed, "semantic_tokens": args.semantic_tokens},
        }

    def step(self, b: int, x: torch.Tensor, s: torch.Tensor, scorer: Scorer) -> None:
        if self.semantic_tokens == "map-only":
            sem = self.tokenizer.image_model.encode_semantic(s).flatten(1)
        else:
            sem = self.tokenizer(x, s)[0]
        gen = torch.Generator(device=self.dev).manual_seed(self.seed * 1_000_003 + b)  # by global batch number
        tokens = sample_image_tokens(self.gpt, sem, generator=gen, **self.sampling)
        scorer.update(quantize_uint8(self.tokenizer.decode(sem, tokens, self.grid)), x, s)
        self.usage_gen.update(tokens)
        self.usage_sem.update(sem)

    def finish(self) -> dict:
        self.usage_gen.all_reduce()
        self.usage_sem.all_reduce()
        return {
            "codebook": {
                "generated_image_tokens": self.usage_gen.summary(),
                "semantic_tokens": self.usage_sem.summary(),
            }
        }

    def per_class_columns(self) -> dict[str, ConfusionMatrix]:
        return {}


def _version(pkg: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def evaluate(args, ranks, dev, task) -> dict:
    """Run `task` over this rank's share of the held-out samples, aggregate over ranks, return the results."""
    scorer = Scorer(args, dev, task.num_classes, task.ignore_index)
    truth = ConfusionMatrix(task.num_classes, task.ignore_index)  # the maps against themselves: class pixel counts
    loader = _eval_loader(task.shards, args, task.image_size)
    total = loader.dataset.num_samples
    n = min(total, args.max_samples) if args.max_samples > 0 else total
    todo = {}
    if task.has_image:
        todo = scorer.use_cache(args.stats_cache, task.shards, {"image_size": task.image_size, "samples": n})
    t0 = time.time()
    with torch.no_grad():
        for b, batch in _my_batches(loader, ranks, n, args.batch_size):
            x, s = batch["image"].to(dev), batch["label"].to(dev)
            truth.update(s, s)
            task.step(b, x, s, scorer)
    seconds = time.time() - t0
    # collectives, in the same order on every rank
    scorer.all_reduce()
    all_reduce_confusion(truth)
    extra = task.finish()
    if ranks.is_main:
        for name, (path, key) in todo.items():
            save_stats(path, scorer.fid_real if name == "fid" else scorer.fsd_real, key)

    if task.has_image:
        metrics = scorer.results(task.fake_name)
    else:
        metrics = {k: "n/a (model has no image decoder)" for k in ("ssim", "psnr_db", "lpips", "fid", "fsd")}
    metrics.update(extra)
    rows = [
        {"class": r["class"], "id": r["id"], "gt_pixel_share": r["gt_pixel_share"]}
        for r in per_class_stats(truth, class_names(task.num_classes))
    ]
    columns = task.per_class_columns()
    if task.has_image and scorer.segmenter is not None:
        columns[f"segmenter_iou_{task.fake_name}"] = scorer.seg_fake
        columns["segmenter_iou_real"] = scorer.seg_real
    for col, cm in columns.items():
        for r, v in zip(rows, cm.iou().tolist()):
            r[col] = v
    return {
        "mode": args.mode,
        "model": args.name or task.run_name,
        "metrics": metrics,
        "per_class": rows,
        "settings": {
            **task.settings,
            "shards": [os.path.abspath(s) for s in task.shards],
            "samples": n,
            "samples_available": total,
            "image_size": task.image_size,
            "batch_size": args.batch_size,
            "world_size": ranks.world,
            "device": str(dev),
            "weights": {
                "vgg": os.path.abspath(args.vgg_weights) if args.vgg_weights else None,
                "inception": os.path.abspath(args.inception_weights) if args.inception_weights else None,
                "inception_sha256": scorer.inception.sha256 if scorer.inception is not None else None,
                "segmenter": os.path.abspath(args.segmenter) if args.segmenter else None,
                "segmenter_val_miou": scorer.segmenter_meta.get("val_miou") if scorer.segmenter else None,
            },
            "versions": {p: _version(p) for p in ("torch", "torchmetrics", "pytorch-fid", "lpips", "accelerate")},
            "python": platform.python_version(),
            "seconds": round(seconds, 2),
        },
    }


# -------------------------------------------------------------------------------------------------------------
# output


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _fmt(v, digits: int = 4, scale: float = 1.0) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v * scale:.{digits}f}"


def markdown(res: dict) -> str:
    m, s = res["metrics"], res["settings"]
    name = res["model"]
    where = os.path.dirname(s["shards"][0])
    data = f"{len(s['shards'])} shard(s) in {where}, first {s['samples']} samples, {s['image_size']}px"
    lines = []
    if res["mode"] == "stage1":
        lines += [
            f"# Reconstruction: {name}",
            "",
            f"Data: {data}. Reconstructions rounded to 8 bits before scoring.",
            "",
            "## Image reconstruction (paper Table 2 layout)",
            "",
            "| model | FID↓ | SSIM↑ | LPIPS↓ |",
            "|---|---|---|---|",
            f"| {name} | {_fmt(m['fid'], 2)} | {_fmt(m['ssim'])} | {_fmt(m['lpips'])} |",
            "",
            "## Semantic reconstruction (paper Table 3 layout)",
            "",
            "| model | mIoU (%)↑ |",
            "|---|---|",
            f"| {name} | {_fmt(m['semantic_miou'], 2, 100)} |",
        ]
        fake = "recon"
    else:
        sm = s["sampling"]
        lines += [
            f"# Semantic image synthesis: {name}",
            "",
            f"Data: {data}. One sample per map: temperature {sm['temperature']}, top-k {sm['top_k']}, top-p "
            f"{sm['top_p']}, guidance {sm['guidance_scale']}, seed {sm['seed']}, z_s from {sm['semantic_tokens']}. "
            "SSIM / LPIPS against the real image with the same map; samples rounded to 8 bits.",
            "",
            "## Generation (paper Table 1 layout)",
            "",
            "| model | FID↓ | SSIM↑ | LPIPS↓ |",
            "|---|---|---|---|",
            f"| {name} | {_fmt(m['fid'], 2)} | {_fmt(m['ssim'])} | {_fmt(m['lpips'])} |",
        ]
        fake = "generated"
    lines += ["", "## Other metrics", "", "| metric | value |", "|---|---|"]
    other = [
        ("PSNR (dB)", _fmt(m["psnr_db"], 2)),
        ("SSIM std over images", _fmt(m.get("ssim_std"))),
        ("FSD (Frechet segmenter distance)", _fmt(m["fsd"], 4)),
        (f"segmenter mIoU on {fake} images (%)", _fmt(m.get(f"segmenter_miou_{fake}", "n/a"), 2, 100)),
        ("segmenter mIoU on real images (%), its reference", _fmt(m.get("segmenter_miou_real", "n/a"), 2, 100)),
    ]
    if res["mode"] == "stage1":
        other.append(("semantic pixel accuracy (%)", _fmt(m["semantic_pixel_acc"], 2, 100)))
        other.append(
            (
                f"semantic mIoU from the map alone (%) (image dropout {m.get('image_dropout', 0)})",
                _fmt(m.get("semantic_miou_map_only", "n/a"), 2, 100),
            )
        )
    for cb_name, cb in m["codebook"].items():
        if isinstance(cb, dict):
            other.append(
                (
                    f"codebook usage: {cb_name}",
                    f"{cb['codes_used']}/{cb['codebook_size']} codes ({100 * cb['used_fraction']:.1f}%), "
                    f"perplexity {cb['perplexity']:.1f}",
                )
            )
        else:
            other.append((f"codebook usage: {cb_name}", cb))
    lines += [f"| {k} | {v} |" for k, v in other]
    cols = [c for c in res["per_class"][0] if c not in ("class", "id")] if res["per_class"] else []
    headers = {
        "gt_pixel_share": "ground-truth pixels",
        "semantic_iou": "semantic reconstruction IoU",
        f"segmenter_iou_{fake}": f"segmenter IoU on {fake}",
        "segmenter_iou_real": "segmenter IoU on real",
    }
    head = " | ".join(headers.get(c, c) for c in cols)
    lines += ["", "## Per class (%)", "", f"| class | {head} |", "|---|" + "---|" * len(cols)]
    for r in res["per_class"]:
        vals = [_fmt(r[c], 2, 100) for c in cols]
        lines.append(f"| {r['class']} | " + " | ".join(vals) + " |")
    lines += ["", "n/a: the class is absent from both the ground truth and the prediction.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.cpu)
    ranks, dev = Ranks(accelerator), accelerator.device
    task = (Stage1Task if args.mode == "stage1" else Stage2Task)(args, ranks, dev)
    res = evaluate(args, ranks, dev, task)
    if ranks.is_main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(_finite(res), f, indent=1)
        md_text = markdown(res)
        with open(os.path.join(args.out, "metrics.md"), "w") as f:
            f.write(md_text)
        print(md_text)
    ranks.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
