"""Vector quantizer module used by every stage-1 model (image and semantic codebooks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from svq_fast.kernels.vq import vq


class VectorQuantizer(nn.Module):
    """Quantizes a (B, D, H, W) latent against a (K, D) codebook.

    Returns (z_q (B, D, H, W), loss (), info) where info holds `indices` (B, H, W) and `perplexity`.
    """

    def __init__(self, codebook_size: int, dim: int, *, beta: float = 0.25, cosine: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.cosine, self.backend = cosine, backend
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.cosine else w

    def forward(self, z: torch.Tensor):
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, D)
        if self.cosine:
            flat = F.normalize(flat, dim=1)
        out = vq(flat, self.codebook(), self.beta, backend=self.backend)
        z_q = out.z_q.view(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            counts = torch.bincount(out.indices, minlength=self.codebook_size).float()
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        info = {"indices": out.indices.view(b, h, w), "perplexity": perplexity}
        return z_q, out.loss_codebook + out.loss_commit, info

    @torch.no_grad()
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) int -> (B, D, H, W) codes."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()
