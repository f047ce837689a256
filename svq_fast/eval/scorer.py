"""The metric networks of one evaluation and their streaming states: SSIM / PSNR, LPIPS, FID, and the
segmenter's FSD and mIoU (svq_fast/models/segmenter.py), each summed or merged over ranks at the end."""

from __future__ import annotations

import os

import torch

from svq_fast.data.synthetic import SYNTHETIC_VERSION
from svq_fast.eval.fid import (
    InceptionFeatures,
    file_sha256,
    frechet_distance_of,
    load_stats,
    stats_cache_path,
    stats_key,
)
from svq_fast.eval.image_metrics import LPIPSMetric, psnr, ssim
from svq_fast.eval.metrics import FeatureStats, MeanStat
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.export import load_segmenter
from svq_fast.models.slices import in_slices

NA_WEIGHTS = "n/a (no weights)"
STATS_VERSION = 1  # bump when the real-image preprocessing changes (invalidates cached statistics)


def frechet_or_na(fake: FeatureStats, real: FeatureStats):
    if fake.n < 2 or real.n < 2:
        return "n/a (fewer than 2 samples)"
    return frechet_distance_of(fake, real)


class Scorer:
    """The metric networks that were given and the streaming states of one evaluation."""

    def __init__(self, args, dev, num_classes: int, ignore_index: int):
        self.dev = dev
        self.lpips = LPIPSMetric(args.vgg_weights).to(dev) if args.vgg_weights else None
        self.inception = InceptionFeatures(args.inception_weights).to(dev) if args.inception_weights else None
        self.segmenter, self.segmenter_meta = (None, {})
        if args.segmenter:
            self.segmenter, self.segmenter_meta = load_segmenter(args.segmenter, dev)
            trained_on = self.segmenter_meta.get("synthetic_version")
            if trained_on is not None and trained_on != SYNTHETIC_VERSION:
                raise ValueError(
                    f"segmenter {args.segmenter} was trained on synthetic scenes of version {trained_on}, the "
                    f"generator is at version {SYNTHETIC_VERSION}: retrain it (recipes/train_segmenter.py)"
                )
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
            logits, feats = in_slices(self.segmenter.forward_features, fake)
            self.fsd_fake.update(feats)
            self.seg_fake.update(logits.argmax(1), label)
            logits_r, feats_r = in_slices(self.segmenter.forward_features, real)
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
        self.seg_fake.all_reduce()
        self.seg_real.all_reduce()

    def results(self, fake_name: str) -> dict:
        out = {
            "ssim": self.ssim.mean(),
            "ssim_std": self.ssim.std(),
            "psnr_db": self.psnr.mean(),
            "lpips": self.lpips_stat.mean() if self.lpips is not None else NA_WEIGHTS,
            "fid": frechet_or_na(self.fid_fake, self.fid_real) if self.inception is not None else NA_WEIGHTS,
            "fsd": frechet_or_na(self.fsd_fake, self.fsd_real) if self.segmenter is not None else NA_WEIGHTS,
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
