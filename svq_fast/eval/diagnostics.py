"""Where do the semantics get lost? One table of images decoded or sampled in different ways, every row scored by
the same segmenter against the conditioning map, plus the GPT's image-token NLL with and without the condition.

Rows (per held-out map, z_s = the map's semantic tokens):
- real images                   the instrument's own score: the ceiling of every other row
- reconstructions               decoder(z_x, z_s) with the scene's own tokens
- another scene's z_x           decoder(z_x of the previous map in the batch, z_s): does the layout come from z_s?
- random z_x                    decoder(uniform random image tokens, z_s)
- GPT samples                   the evaluation's sampling settings
- GPT samples, null condition   guidance scale 0: the logits of the CFG null embedding alone
- GPT samples, guidance g       classifier-free guidance with scale g > 1

A decoder that follows z_s keeps the layout when z_x is swapped; a GPT that earns its place beats random tokens
on realism (FSD) and matches or beats them on the map (segmenter mIoU); a condition that informs the GPT gives a
lower NLL than the null condition (the gap, in bits per image token, is what the condition tells it).
"""

from __future__ import annotations

import math

import torch

from svq_fast.eval.image_metrics import quantize_uint8
from svq_fast.eval.metrics import FeatureStats, MeanStat
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.eval.sampling import sample_image_tokens
from svq_fast.models.slices import in_slices

REAL, RECON, SWAP, RANDOM = "real images", "reconstructions", "another scene's z_x", "random z_x"
SAMPLES, NULL = "GPT samples", "GPT samples, null condition"


def guided_row(scale: float) -> str:
    return f"GPT samples, guidance {scale:g}"


class MapFidelity:
    """Segmenter mIoU against the conditioning map and FSD features of one row of images."""

    def __init__(self, num_classes: int, ignore_index: int, feature_dim: int):
        self.cm = ConfusionMatrix(num_classes, ignore_index)
        self.features = FeatureStats(feature_dim)

    def update(self, segmenter, images: torch.Tensor, label: torch.Tensor) -> None:
        logits, feats = in_slices(segmenter.forward_features, images)  # images (B, 3, H, W) on the 8-bit grid
        self.cm.update(logits.argmax(1), label)
        self.features.update(feats)

    def all_reduce(self) -> None:
        self.cm.all_reduce()
        self.features.all_reduce()


class Diagnostics:
    """Stage-2 diagnostic rows and the NLL gap, updated batch by batch (see the module docstring)."""

    def __init__(self, task, segmenter, guidance: float):
        self.task, self.segmenter, self.guidance = task, segmenter, guidance
        self.rows: dict[str, MapFidelity] = {}
        if segmenter is not None:
            names = [REAL, RECON, SWAP, RANDOM, SAMPLES, NULL, guided_row(guidance)]
            self.rows = {n: MapFidelity(task.num_classes, task.ignore_index, segmenter.feature_dim) for n in names}
        self.nll_cond, self.nll_null, self.nll_gap = MeanStat(), MeanStat(), MeanStat()  # bits per image token

    @torch.no_grad()
    def update(self, b: int, x, s, sem, img, samples, generator: torch.Generator) -> None:
        """x (B, 3, H, W), s (B, H, W), sem / img (B, N) the map's and the scene's tokens, samples (B, 3, H, W) the
        GPT's samples at the evaluation's settings, decoded and on the 8-bit grid (the task scored them already);
        generator seeds this batch's extra draws."""
        gpt, tok, grid = self.task.gpt, self.task.tokenizer, self.task.grid
        uncond = torch.ones(sem.shape[0], dtype=torch.bool, device=sem.device)
        cond_bits = gpt.image_nll(sem, img) / math.log(2)
        null_bits = gpt.image_nll(sem, img, uncond=uncond) / math.log(2)
        self.nll_cond.update(cond_bits)
        self.nll_null.update(null_bits)
        self.nll_gap.update(null_bits - cond_bits)
        if not self.rows:
            return
        sampling = dict(self.task.sampling)
        rand = torch.randint(0, tok.image_vocab, img.shape, generator=generator, device=img.device)
        null = sample_image_tokens(gpt, sem, generator=generator, **{**sampling, "guidance_scale": 0.0})
        guided = sample_image_tokens(gpt, sem, generator=generator, **{**sampling, "guidance_scale": self.guidance})
        decoded = {
            REAL: x,
            RECON: tok.decode(sem, img, grid),
            SWAP: tok.decode(sem, img.roll(1, 0), grid),
            RANDOM: tok.decode(sem, rand, grid),
            NULL: tok.decode(sem, null, grid),
            guided_row(self.guidance): tok.decode(sem, guided, grid),
        }
        for name, images in decoded.items():
            self.rows[name].update(self.segmenter, quantize_uint8(images) if name != REAL else images, s)
        self.rows[SAMPLES].update(self.segmenter, samples, s)

    def all_reduce(self) -> None:
        """Collective: every rank calls it."""
        for row in self.rows.values():
            row.all_reduce()
        for st in (self.nll_cond, self.nll_null, self.nll_gap):
            st.all_reduce()

    def results(self) -> dict:
        from svq_fast.eval.scorer import frechet_or_na

        real = self.rows[REAL].features if self.rows else None
        rows = [
            {"images": name, "seg_miou": row.cm.miou(), "fsd": frechet_or_na(row.features, real)}
            for name, row in self.rows.items()
        ]
        return {
            "rows": rows,
            "guidance": self.guidance,
            "nll_bits_per_token": {
                "condition": self.nll_cond.mean(),
                "null_condition": self.nll_null.mean(),
                "gap": self.nll_gap.mean(),
                "gap_std_over_maps": self.nll_gap.std(),
                "maps": self.nll_gap.count,
            },
        }
