"""What an evaluation measures, per mode: Stage1Task (reconstruction: the paper's Tables 2 and 3) and Stage2Task
(generation: Table 1, plus the diagnostic table of svq_fast/eval/diagnostics.py). A task builds its models from
exports, scores one batch at a time with step(), and aggregates over ranks in finish()."""

from __future__ import annotations

import os

import torch

from svq_fast.data.loader import list_shards
from svq_fast.data.run_shards import shards_or_synthetic
from svq_fast.eval.diagnostics import Diagnostics
from svq_fast.eval.image_metrics import quantize_uint8
from svq_fast.eval.metrics import CodebookUsage
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.eval.sampling import sample_image_tokens
from svq_fast.eval.scorer import Scorer
from svq_fast.export import load_gpt, load_stage1, load_tokenizer


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

    def attach(self, scorer: Scorer) -> None:
        pass

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
        if args.semantic_tokens == "map-only" and self.tokenizer.semantic_model is not None:
            raise ValueError(
                "--semantic-tokens map-only needs a coupled (sVQ) stage-1 model; this GPT uses a separate one"
            )
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
        self.seed, self.semantic_tokens = args.seed, args.semantic_tokens
        self.diag_guidance, self.diagnostics = args.diagnostics_guidance, None
        self.usage_gen = CodebookUsage(self.tokenizer.image_vocab)
        self.usage_sem = CodebookUsage(self.tokenizer.semantic_vocab)
        self.settings = {
            "export": os.path.abspath(args.gpt),
            "stage1": os.path.abspath(cfg.stage1),
            "sampling": {**self.sampling, "seed": args.seed, "semantic_tokens": args.semantic_tokens},
        }

    def attach(self, scorer: Scorer) -> None:
        """The diagnostic rows are scored by the evaluation's own segmenter."""
        self.diagnostics = Diagnostics(self, scorer.segmenter, self.diag_guidance) if self.diag_guidance else None

    def step(self, b: int, x: torch.Tensor, s: torch.Tensor, scorer: Scorer) -> None:
        sem, img = self.tokenizer(x, s)  # the scene's own tokens: (B, P), (B, N)
        if self.semantic_tokens == "map-only":
            sem = self.tokenizer.image_model.encode_semantic(s).flatten(1)
        gen = torch.Generator(device=self.dev).manual_seed(self.seed * 1_000_003 + b)  # by global batch number
        tokens = sample_image_tokens(self.gpt, sem, generator=gen, **self.sampling)
        scorer.update(quantize_uint8(self.tokenizer.decode(sem, tokens, self.grid)), x, s)
        self.usage_gen.update(tokens)
        self.usage_sem.update(sem)
        if self.diagnostics is not None:
            self.diagnostics.update(b, x, s, sem, img, tokens, gen)

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
        return out

    def per_class_columns(self) -> dict[str, ConfusionMatrix]:
        return {}
