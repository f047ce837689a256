"""Turning images and semantic maps into pictures: maps in their label space's palette, row-major grids."""

from __future__ import annotations

import numpy as np
import torch

from svq_fast.data.labels import space_for


def colorize(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """labels (B, H, W) int -> (B, 3, H, W) float in [0, 1], in the palette of the model's label space
    (svq_fast.data.labels.space_for); ignore is black, ids outside the space white."""
    table = np.full((256, 3), 255, np.uint8)
    table[:num_classes] = space_for(num_classes).palette[:256]
    table[ignore_index] = 0
    pal = torch.from_numpy(table).to(labels.device)
    return pal[labels.clamp(0, 255).long()].permute(0, 3, 1, 2).float() / 255.0


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1], clamped (dtype kept)."""
    return ((images + 1) / 2).clamp(0, 1)


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
