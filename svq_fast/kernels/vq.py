"""Nearest-codebook vector quantization with codebook + commitment loss.

Contract (shared by every backend):
    vq(z, codebook, beta=0.25, backend="auto") -> VQOutput(z_q, indices, loss_codebook, loss_commit, min_dist)
    z: (N, D) latents, codebook: (K, D).
    indices: (N,) int64 argmin_k ||z_n - e_k||^2;  min_dist: (N,) fp32 the distance at that code.
    z_q: (N, D) straight-through output: value e[indices], gradient passed to z unchanged.
    loss_codebook = mean((sg[z] - e)^2)        -> gradient to the codebook only
    loss_commit   = beta * mean((z - sg[e])^2) -> gradient to z only (beta on the commitment term)
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class VQOutput(NamedTuple):
    z_q: torch.Tensor  # (N, D), dtype of z
    indices: torch.Tensor  # (N,) int64
    loss_codebook: torch.Tensor  # () fp32
    loss_commit: torch.Tensor  # () fp32
    min_dist: torch.Tensor  # (N,) fp32


def vq_ref(z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25) -> VQOutput:
    """The textbook implementation: builds the (N, K) distance matrix."""
    zf, ef = z.float(), codebook.float()
    # ||z||^2 - 2 z.e + ||e||^2 : (N, K)
    dist = zf.pow(2).sum(1, keepdim=True) - 2 * zf @ ef.t() + ef.pow(2).sum(1)[None, :]
    min_dist, indices = dist.min(dim=1)
    e = codebook[indices]  # (N, D)
    loss_codebook = (z.detach().float() - e.float()).pow(2).mean()
    loss_commit = beta * (z.float() - e.detach().float()).pow(2).mean()
    z_q = z + (e - z).detach()
    return VQOutput(z_q, indices, loss_codebook, loss_commit, min_dist.clamp_min(0))


def vq(z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, *, backend: str = "auto") -> VQOutput:
    """Dispatch: explicit backend wins; auto = triton on CUDA, native on CPU when built, ref otherwise."""
    if backend not in ("auto", "ref", "triton", "native"):
        raise ValueError(f"vq: unknown backend {backend!r} (auto|triton|native|ref)")
    if backend in ("triton", "native"):
        raise NotImplementedError(f"vq: backend {backend!r} is not built yet")
    return vq_ref(z, codebook, beta)
