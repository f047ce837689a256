"""What an evaluation measures, per mode: Stage1Task (reconstruction: the paper's Tables 2 and 3) and Stage2Task
(generation: Table 1, plus the diagnostic table of svq_fast/eval/diagnostics.py and the diversity rows of
svq_fast/eval/diversity.py). A task builds its models from exports, scores one batch at a time with step(), and
aggregates over ranks in finish(). Each records the evaluation protocol (protocol()) in its settings."""

from __future__ import annotations

import os

import torch

from svq_fast.data.loader import list_shards
from svq_fast.data.run_shards import shards_or_synthetic
from svq_fast.eval.diagnostics import Diagnostics
from svq_fast.eval.diversity import Diversity
from svq_fast.eval.image_metrics import quantize_uint8
from svq_fast.eval.metrics import CodebookUsage
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.eval.sampling import sample_image_tokens
from svq_fast.eval.scorer import Scorer
from svq_fast.export import load_gpt, load_stage1, load_tokenizer, weights_sha256

FSD_FEATURES = (
    "Frechet distance (float64 mean and covariance, svq_fast/eval/fid.py) of the segmenter's penultimate features, "
    "global-average-pooled (Segmenter.forward_features, {dim} channels), images on the 8-bit grid"
)
FID_FEATURES = "pytorch-fid InceptionV3 pool3 (2048 features)"


def protocol(scorer: Scorer, segmenter: str, resolution: int, exports: dict[str, str], **extra) -> dict:
    """What a number of this evaluation depends on, beside the data (run.py adds shards and sample count):
    the instruments (segmenter sha256, FSD / FID features), the resolution, the exports' sha256 and the task's
    own settings (`extra`: sampling, z_s kind, draws per map)."""
    seg = scorer.segmenter
    return {
        "segmenter": {"path": os.path.abspath(segmenter), "sha256": scorer.segmenter_sha,
                      "val_miou": scorer.segmenter_meta.get("val_miou")} if seg is not None else None,
        "fsd": FSD_FEATURES.format(dim=seg.feature_dim) if seg is not None else "n/a (no segmenter)",
        "fid": FID_FEATURES if scorer.inception is not None else "n/a (no Inception weights)",
        "lpips": "lpips VGG16" if scorer.lpips is not None else "n/a (no VGG weights)",
        "resolution": resolution,
        "exports_sha256": {name: weights_sha256(path) for name, path in exports.items() if path},
        **extra,
    }  # fmt: skip


class Stage1Task:
    """Reconstruction: x_hat and s_hat of each held-out (x, s) pair."""

    fake_name = "recon"

    def __init__(self, args, ranks, dev):
        self.model, cfg = load_stage1(args.stage1, dev)
        m = cfg.model
        self.run_name, self.image_size = cfg.run.name, m.image_size
        self.num_classes, self.ignore_index = m.num_classes, m.ignore_index
        self.has_image, self.has_semantic = self.model.has_image, self.model.has_semantic
        self.shards = list_shards(args.shards) if args.shards else shards_or_synthetic(cfg.data, "val", ranks.rank)
        self.semantic = ConfusionMatrix(m.num_classes, m.ignore_index)
        # coupled models: the semantic map reconstructed from z_s encoded without the reference image
        self.coupled = m.kind == "svq"
        self.semantic_map_only = ConfusionMatrix(m.num_classes, m.ignore_index) if self.coupled else None
        self.image_dropout = m.image_dropout
        q = cfg.quantizer
        self.usage_x = CodebookUsage(q.image_codebook_size) if self.has_image else None
        self.usage_s = CodebookUsage(q.semantic_codebook_size) if self.has_semantic else None
        self.settings = {"export": os.path.abspath(args.stage1)}
        self.export, self.segmenter = args.stage1, args.segmenter

    def step(self, b: int, x: torch.Tensor, s: torch.Tensor, scorer: Scorer, keys=None) -> None:
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

    def attach(self, scorer: Scorer) -> None:
        self.settings["protocol"] = protocol(
            scorer, self.segmenter, self.image_size, {"stage1": self.export}, draws_per_map=1
        )

    def finish(self) -> dict:
        """Collective: the task's own global metrics."""
        self.semantic.all_reduce()
        if self.coupled:
            self.semantic_map_only.all_reduce()
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
        self.tokenizer = load_tokenizer(cfg, dev, allow_stage1_mismatch=args.allow_stage1_mismatch)
        # z_s of the Table-1 samples and the decode rows: the evaluation's choice, else what the GPT trained on
        self.condition = args.condition or cfg.condition
        self.separate = self.tokenizer.semantic_model is not None  # its z_s reads the map alone either way
        m = (self.tokenizer.semantic_model or self.tokenizer.image_model).cfg
        self.run_name, self.num_classes, self.ignore_index = cfg.run.name, m.num_classes, m.ignore_index
        self.image_size, self.grid, self.dev = cfg.data.image_size, cfg.model.grid, dev
        self.shards = list_shards(args.shards) if args.shards else shards_or_synthetic(cfg.data, "val", ranks.rank)
        sample = cfg.sample
        self.sampling = {
            "temperature": sample.temperature if args.temperature is None else args.temperature,
            "top_k": sample.top_k if args.top_k is None else args.top_k,
            "top_p": sample.top_p if args.top_p is None else args.top_p,
            "guidance_scale": sample.guidance_scale if args.guidance is None else args.guidance,
        }
        self.seed, self.batch_size = args.seed, args.batch_size
        self.diag_guidance, self.diagnostics = args.diagnostics_guidance, None
        self.diversity_maps, self.diversity_draws, self.diversity = args.diversity_maps, args.diversity_draws, None
        self.exports = {"gpt": args.gpt, "stage1": cfg.stage1, "stage1_semantic": cfg.stage1_semantic}
        self.gpt_condition, self.segmenter = cfg.condition, args.segmenter
        self.usage_gen = CodebookUsage(self.tokenizer.image_vocab)
        self.usage_sem = CodebookUsage(self.tokenizer.semantic_vocab)
        self.settings = {
            "export": os.path.abspath(args.gpt),
            "stage1": os.path.abspath(cfg.stage1),
            "sampling": {**self.sampling, "seed": args.seed, "semantic_tokens": self.z_s_kind()},
        }

    def z_s_kind(self) -> str:
        if self.separate:
            return "map (separate semantic model)"
        return "map alone (encode_semantic)" if self.condition == "map" else "reference (real image, map)"

    def attach(self, scorer: Scorer) -> None:
        """The diagnostic and diversity rows are scored by the evaluation's own segmenter (and LPIPS)."""
        self.diagnostics = Diagnostics(self, scorer.segmenter, self.diag_guidance) if self.diag_guidance else None
        if self.diversity_maps > 0:
            self.diversity = Diversity(self, scorer.segmenter, scorer.lpips, self.shards,
                                       maps=self.diversity_maps, draws=self.diversity_draws)  # fmt: skip
        self.settings["protocol"] = protocol(
            scorer, self.segmenter, self.image_size, self.exports, sampling=self.sampling, z_s=self.z_s_kind(),
            gpt_trained_on=self.gpt_condition, draws_per_map=1,
            diversity={"maps": self.diversity_maps, "draws_per_map": self.diversity_draws},
        )  # fmt: skip

    def step(self, b: int, x: torch.Tensor, s: torch.Tensor, scorer: Scorer, keys=None) -> None:
        sem, img = self.tokenizer.tokens(x, s, self.condition)  # z_s to sample on (B, P), the scene's z_x (B, N)
        gen = torch.Generator(device=self.dev).manual_seed(self.seed * 1_000_003 + b)  # by global batch number
        tokens = sample_image_tokens(self.gpt, sem, generator=gen, **self.sampling)
        images = quantize_uint8(self.tokenizer.decode(sem, tokens, self.grid))  # (B, 3, H, W)
        scorer.update(images, x, s)
        self.usage_gen.update(tokens)
        self.usage_sem.update(sem)
        if self.diagnostics is not None:
            self.diagnostics.update(b, x, s, sem, img, images, gen)
        if self.diversity is not None:
            if keys is None:
                raise ValueError("the diversity rows need the samples' keys (re-renders): pass keys to step()")
            self.diversity.update(b, b * self.batch_size, keys, x, s, img)

    def finish(self) -> dict:
        self.usage_gen.all_reduce()
        self.usage_sem.all_reduce()
        out = {
            "codebook": {
                "generated_image_tokens": self.usage_gen.summary(),
                "semantic_tokens": self.usage_sem.summary(),
            }
        }
        if self.diagnostics is not None:
            self.diagnostics.all_reduce()
            out["diagnostics"] = self.diagnostics.results()
        if self.diversity is not None:
            self.diversity.all_reduce()
            out["diversity"] = self.diversity.results()
        return out

    def per_class_columns(self) -> dict[str, ConfusionMatrix]:
        return {}
