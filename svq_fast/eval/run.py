"""One evaluation, end to end: a typed EvalConfig -> the task's models -> this rank's share of the held-out batches
-> metrics aggregated over ranks -> <out>/metrics.json and <out>/metrics.md. recipes/evaluate.py is its CLI.

Data: held-out shards (EvalConfig.shards; default: the synthetic val split of the model's data config), read once
each, center-cropped, unflipped, in shard-list order; max_samples N evaluates the first N of that order. Samples
that cannot be read are left out: settings.samples_scored says how many were scored (metrics.md warns when that is
fewer than planned); an evaluation that scored none raises EvaluationError (evaluate.py exits 1). Batches of
that one sequence are split over ranks (svq_fast/eval/ranks.py); every metric is a streaming state summed or merged
over ranks at the end, so the result does not depend on the number of ranks (stage 2 seeds each batch's sampling
by (seed, batch number): same samples for any rank count at a fixed batch size). Every generated or reconstructed
image is rounded to 8 bits (as saved PNGs) before any metric.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from svq_fast import dist
from svq_fast.data.labels import space_for
from svq_fast.eval.fid import save_stats
from svq_fast.eval.metrics import per_class_stats
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.eval.ranks import Ranks, eval_loader, my_batches
from svq_fast.eval.report import json_safe, markdown
from svq_fast.eval.scorer import Scorer
from svq_fast.eval.tasks import Stage1Task, Stage2Task


def default_stats_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "svq_fast", "eval_stats")


@dataclass(kw_only=True)
class EvalConfig:
    """Everything one evaluation reads; recipes/evaluate.py fills it from its flags (same names)."""

    mode: Literal["stage1", "stage2"]
    out: str  # output directory for metrics.json and metrics.md
    stage1: str = ""  # stage-1 export (stage1 mode; in stage2 mode overrides the GPT's)
    gpt: str = ""  # stage-2 export (stage2 mode)
    shards: str = ""  # held-out shards ("" = the model config's synthetic val split)
    max_samples: int = 0  # evaluate the first N samples (0 = all)
    batch_size: int = 64
    num_workers: int = 0
    name: str = ""  # model name in the tables ("" = the export's run name)
    vgg_weights: str = ""  # torchvision vgg16-397923af.pth (LPIPS backbone)
    inception_weights: str = ""  # pytorch-fid pt_inception-2015-12-05-6726825d.pth
    segmenter: str = ""  # segmenter directory (recipes/train_segmenter.py)
    stats_cache: str = field(default_factory=default_stats_cache)  # cached real-image statistics ('none': off)
    # stage-2 sampling; None = the GPT config's sample section
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    guidance: float | None = None
    seed: int = 0
    condition: Literal["", "reference", "map"] = ""  # z_s from (image, map) or the map alone; "": the GPT's own
    diversity_maps: int = 32  # stage 2: K draws for each of the first N maps (svq_fast/eval/diversity.py); 0 = off
    diversity_draws: int = 4
    # stage 2: guidance scale of the diagnostic table's guided row (0 = no diagnostic sampling rows)
    diagnostics_guidance: float = 3.0
    cpu: bool = False  # stay on the CPU even when a GPU is present
    allow_stage1_mismatch: bool = False  # stage 2: accept a stage-1 export other than the GPT's (export.py)

    def __post_init__(self):
        if self.mode == "stage1" and not self.stage1:
            raise ValueError("mode stage1 needs stage1 = a stage-1 export directory")
        if self.mode == "stage2" and not self.gpt:
            raise ValueError("mode stage2 needs gpt = a stage-2 export directory")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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
    task.attach(scorer)  # tasks that score extra rows (stage 2's diagnostics) use the same networks
    try:
        loader = eval_loader(task.shards, args.batch_size, args.num_workers, task.image_size)
    except (OSError, ValueError) as e:  # no readable sample at all, a missing index, a shard that is not there
        raise EvaluationError(f"cannot evaluate on {_named(task.shards)}: {e}") from e
    total = loader.dataset.num_samples
    n = min(total, args.max_samples) if args.max_samples > 0 else total
    todo = {}
    if task.has_image:
        todo = scorer.use_cache(args.stats_cache, task.shards, {"image_size": task.image_size, "samples": n})
    t0 = time.time()
    scored = torch.zeros(1, dtype=torch.float64)  # samples this rank scored (unreadable ones arrive as pads)
    with torch.no_grad():
        for b, batch in my_batches(loader, ranks, n, args.batch_size):
            x, s = batch["image"].to(dev), batch["label"].to(dev)
            truth.update(s, s)
            scored += x.shape[0]
            task.step(b, x, s, scorer, batch["key"])
    seconds = time.time() - t0
    # collectives, in the same order on every rank
    scorer.all_reduce()
    truth.all_reduce()
    dist.all_reduce_sum_(scored)
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
        for r in per_class_stats(truth, space_for(task.num_classes).names)
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
            "samples_scored": int(scored.item()),  # < samples when some could not be read (report.py warns)
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


def run_evaluation(cfg: EvalConfig) -> dict:
    """Evaluate on every rank of the launch; rank 0 writes <out>/metrics.json and metrics.md. -> the results."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cfg.cpu)
    ranks, dev = Ranks(accelerator), accelerator.device
    task = (Stage1Task if cfg.mode == "stage1" else Stage2Task)(cfg, ranks, dev)
    res = evaluate(cfg, ranks, dev, task)
    if ranks.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump(json_safe(res), f, indent=1)
        md_text = markdown(res)
        with open(os.path.join(cfg.out, "metrics.md"), "w") as f:
            f.write(md_text)
        print(md_text)
    ranks.barrier()
    if res["settings"]["samples_scored"] == 0:  # the same on every rank: summed over them
        raise EvaluationError(
            f"no sample was scored: none of the {res['settings']['samples']} planned sample(s) of "
            f"{_named(task.shards)} could be read (see the svq_fast.data warnings above); {cfg.out}/metrics.json "
            "records samples_scored 0 and no metric. Check or rewrite the shards (python -m svq_fast.data.make_shards)"
        )
    return res


class EvaluationError(RuntimeError):
    """The evaluation could not score anything; the message names the shards. recipes/evaluate.py exits 1."""


def _named(shards: list[str]) -> str:
    head = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
    return f"the {len(shards)} shard(s) {head}"
