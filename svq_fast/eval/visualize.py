"""Turning images and semantic maps into pictures: a fixed class palette and row-major grids."""

from __future__ import annotations

import colorsys

import numpy as np
import torch


def palette(num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(256, 3) uint8; class c gets a well-spread hue (golden-ratio steps), ignore is black."""
    pal = np.zeros((256, 3), np.uint8)
    for c in range(min(num_classes, 256)):
        h = (c * 0.618033988749895) % 1.0
        s = 0.55 + 0.45 * ((c * 7) % 3) / 2
        v = 0.65 + 0.35 * ((c * 5) % 2)
        pal[c] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    pal[ignore_index] = 0
    return pal


def colorize(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """labels (B, H, W) int -> (B, 3, H, W) float in [0, 1]."""
    pal = torch.from_numpy(palette(num_classes, ignore_index)).to(labels.device)
    return pal[labels.clamp(0, 255).long()].permute(0, 3, 1, 2).float() / 255.0


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def grid(rows: list[list[torch.Tensor]], pad: int = 2) -> torch.Tensor:
    """rows of (3, H, W) tensors in [0, 1] -> one (3, H', W') image with white padding."""
    h, w = rows[0][0].shape[-2:]
    ncol = max(len(r) for r in rows)
    out = torch.ones(3, len(rows) * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[:, y : y + h, x : x + w] = img.cpu()
    return out


def save_png(image: torch.Tensor, path: str) -> None:
    """(3, H, W) in [0, 1] -> PNG."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)
