"""Per-image SSIM, PSNR (torchmetrics) and LPIPS (our LPIPSLoss: lpips' VGG heads + a local VGG-16 file).

Conventions: inputs are image batches (B, 3, H, W) in [-1, 1] (the models' range); every function returns one
value per image, (B,) float64, so that padded samples can be dropped and means streamed (metrics.MeanStat).
- SSIM (Wang et al. 2004) via torchmetrics.functional.structural_similarity_index_measure on [0, 1] RGB in
  float64, data_range=1.0 set explicitly, Gaussian window 11 / sigma 1.5, K1 0.01, K2 0.03, mean over the
  three channels and the valid window positions (those whose window lies inside the image, as in Wang et al.'s
  reference code). This matches skimage.metrics.structural_similarity
  with gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0 (tests check it).
- PSNR via torchmetrics.functional.peak_signal_noise_ratio on [0, 1], data_range=1.0, per image (inf for an
  exact copy).
- LPIPS: the lpips package's v0.1 VGG linear heads and torchvision's VGG-16 features read from `vgg_path`
  (svq_fast.losses.perceptual.LPIPSLoss); nothing is downloaded.

`quantize_uint8` rounds images to the 8-bit grid they would have once saved as PNG; evaluate.py applies it to
generated and reconstructed images before every metric, as the published FID/SSIM/LPIPS scripts read PNGs.
"""

from __future__ import annotations

import torch
from torch import nn

from svq_fast.eval.visualize import to_unit

SSIM_KERNEL, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the same range on the 8-bit grid: (round((x + 1) * 127.5) / 127.5) - 1."""
    return torch.round((x.float().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"{what}: expected two (B, 3, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) float64 of two batches in [-1, 1].

    torchmetrics (1.9) averages its SSIM map over the whole image, including the border positions it computes on
    reflect-padded input; Wang et al.'s reference code (filter2 'valid') and skimage average over the positions
    whose window lies inside the image. We take torchmetrics' full map and average those valid positions."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(x, y, "ssim")
    pad = (SSIM_KERNEL - 1) // 2
    if min(x.shape[-2:]) <= 2 * pad:
        raise ValueError(
            f"ssim: images of {tuple(x.shape[-2:])} are too small for the {SSIM_KERNEL}x{SSIM_KERNEL} window"
        )
    _, full = structural_similarity_index_measure(
        to_unit(x.double()),
        to_unit(y.double()),
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL,
        reduction="none",
        data_range=1.0,
        k1=SSIM_K1,
        k2=SSIM_K2,
        return_full_image=True,
    )
    return full[..., pad:-pad, pad:-pad].mean((1, 2, 3))  # (B,)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,) float64 of two batches in [-1, 1], peak 1 on the [0, 1] scale."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(x, y, "psnr")
    return peak_signal_noise_ratio(
        to_unit(x.double()), to_unit(y.double()), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


class LPIPSMetric(nn.Module):
    """Per-image LPIPS distance (VGG, lpips v0.1 heads); frozen. The backbone comes from `vgg_path` (torchvision's
    vgg16-397923af.pth); a missing file raises FileNotFoundError naming it."""

    def __init__(self, vgg_path: str):
        super().__init__()
        from svq_fast.losses.perceptual import LPIPSLoss

        self.loss = LPIPSLoss(vgg_path)
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y, "lpips")
        return self.loss.model(x.float(), y.float()).flatten().double()  # (B,)


__all__ = ["quantize_uint8", "ssim", "psnr", "LPIPSMetric"]
