"""Turning (image, semantic map) batches into stage-2 token sequences with frozen stage-1 models.

Coupled (sVQ) model: z_x comes from the one encoder f_sEnc(x, s); z_s too with condition "reference" (the paper: it
then carries the image's appearance), or from the map alone with condition "map" (`encode_semantic`), so the GPT
must model the appearance that a map leaves open.
Separate baseline (VQ-T): z_x from an image-only VQ model, z_s from a semantic-only VQVAE (map-only either way).
"""

from __future__ import annotations

import torch

from svq_fast.models.slices import in_slices
from svq_fast.models.svq import SVQModel


class Tokenizer:
    def __init__(self, image_model: SVQModel, semantic_model: SVQModel | None = None, condition: str = "reference"):
        if condition not in ("reference", "map"):
            raise ValueError(f"Tokenizer condition must be 'reference' or 'map', got {condition!r}")
        if semantic_model is None and image_model.cfg.kind != "svq":
            raise ValueError(
                "an image-only stage-1 model needs a separate semantic model for the condition "
                "(set stage1_semantic to a semantic VQVAE export)"
            )
        self.image_model, self.semantic_model = image_model, semantic_model
        self.condition = "map" if semantic_model is not None else condition  # a separate model reads the map alone

    @property
    def semantic_vocab(self) -> int:
        m = self.semantic_model or self.image_model
        return m.quantizer_s.codebook_size

    @property
    def image_vocab(self) -> int:
        return self.image_model.quantizer_x.codebook_size

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W), s (B, H, W) -> (semantic tokens (B, P), image tokens (B, N)), row-major grids."""
        m = self.image_model
        if self.semantic_model is None and self.condition == "map" and m.cfg.semantic_input != "map":
            # the scene's z_x and the map-only z_s in one encoder pass over the 2B batch [(x, s); (fill, s)]
            b = x.shape[0]
            out = m.encode(torch.cat([x, m.fill_image(s)]), torch.cat([s, s]))
            sem, img = out["indices_s"][b:], out["indices_x"][:b]
        elif self.semantic_model is None:  # a map-input model's z_s reads the map alone already
            out = m.encode(x, s)
            sem, img = out["indices_s"], out["indices_x"]
        else:
            img = self.image_model.encode(x, None)["indices_x"]
            sem = self.semantic_model.encode(None, s)["indices_s"]
        return sem.flatten(1), img.flatten(1)

    @torch.no_grad()
    def semantic_tokens(self, x: torch.Tensor, s: torch.Tensor, condition: str) -> torch.Tensor:
        """(B, P) condition tokens of either kind, whatever this tokenizer trains on: "reference" reads (x, s),
        "map" the map alone (a separate semantic model reads the map alone either way)."""
        if self.semantic_model is not None:
            return self.semantic_model.encode(None, s)["indices_s"].flatten(1)
        if condition == "map":
            return self.image_model.encode_semantic(s).flatten(1)
        return self.image_model.encode(x, s)["indices_s"].flatten(1)

    @torch.no_grad()
    def image_tokens(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W), s (B, H, W) -> the scenes' image tokens (B, N) alone: an encoder pass over the B scenes,
        without the map-only half of the 2B batch that __call__ encodes for a map-condition tokenizer."""
        if self.semantic_model is None:
            return self.image_model.encode(x, s)["indices_x"].flatten(1)
        return self.image_model.encode(x, None)["indices_x"].flatten(1)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor, s: torch.Tensor, condition: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition tokens of the given kind (B, P), the scene's image tokens (B, N)): one encoder call when the
        condition is the one this tokenizer trains on (or its z_s reads the map either way), two otherwise."""
        sem, img = self(x, s)
        if self.semantic_model is None and condition != self.condition:
            sem = self.semantic_tokens(x, s, condition)
        return sem, img

    @torch.no_grad()
    def decode(self, sem_tokens: torch.Tensor, img_tokens: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
        """Image tokens (B, N) (+ the condition for the coupled decoder) -> images (B, 3, H, W) in [-1, 1]. grid: the
        latent grid's side, or (rows, columns) for the larger / non-square grids of sliding-window sampling."""
        b = img_tokens.shape[0]
        h, w = (grid, grid) if isinstance(grid, int) else grid
        idx_x = img_tokens.view(b, h, w)
        if self.semantic_model is None:
            return in_slices(self.image_model.decode_indices, idx_x, sem_tokens.view(b, h, w))
        return in_slices(lambda i: self.image_model.decode_indices(i, None), idx_x)
