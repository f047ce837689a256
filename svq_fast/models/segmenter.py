"""A small fully-convolutional segmentation net (U-Net shaped) that scores generated images by their semantics.

It is trained on real images (recipes/train_segmenter.py) to predict the label map; evaluate.py then reports
the mIoU of its predictions on generated images against the map they were generated from, and the Frechet
distance between real and generated images in its feature space ("FSD", Frechet segmenter distance: the
global average of the penultimate feature map, `width` dims). Both are only as good as the segmenter: the
recipe prints its mIoU on real held-out images, and evaluate.py reports it beside the generated-image score.

Shape, for width w and L levels: stem (3 -> w, full resolution) -> L x [stride-2 conv, doubling the width
(capped at 8w), two 3x3 conv blocks] -> L x [nearest 2x upsample, 3x3 conv, + skip, 3x3 conv block] ->
penultimate (B, w, H, W) -> 1x1 classifier. Inputs (B, 3, H, W) in [-1, 1], H and W divisible by 2^L.

Saved as <dir>/model.safetensors + <dir>/config.json ({"type": "SegmenterConfig", "config": ..., "meta": ...}).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_TYPE = "SegmenterConfig"


@dataclass(kw_only=True)
class SegmenterConfig:
    num_classes: int = 16
    ignore_index: int = 255
    width: int = 32  # full-resolution width = the FSD feature dimension
    levels: int = 3  # downsamplings
    groups: int = 8  # GroupNorm groups (divide width)
    image_size: int = 64  # the resolution it was trained at (informational: the net is fully convolutional)

    def __post_init__(self):
        if self.width % self.groups:
            raise ValueError(f"SegmenterConfig: groups={self.groups} does not divide width={self.width}")
        if self.levels < 1 or self.num_classes < 2:
            raise ValueError("SegmenterConfig: needs levels >= 1 and num_classes >= 2")


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())


class Segmenter(nn.Module):
    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        self.cfg = cfg
        w, g = cfg.width, cfg.groups
        widths = [min(w * 2**i, 8 * w) for i in range(cfg.levels + 1)]
        self.stem = nn.Sequential(_block(3, w, g), _block(w, w, g))
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1),
                nn.GroupNorm(g, widths[i + 1]),
                nn.SiLU(),
                _block(widths[i + 1], widths[i + 1], g),
                _block(widths[i + 1], widths[i + 1], g),
            )
            for i in range(cfg.levels)
        )
        self.up_conv = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in range(cfg.levels))
        self.up_block = nn.ModuleList(_block(widths[i], widths[i], g) for i in range(cfg.levels))
        self.head = nn.Conv2d(w, cfg.num_classes, 1)

    @property
    def feature_dim(self) -> int:
        return self.cfg.width

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (logits (B, C, H, W), pooled penultimate features (B, width))."""
        f = 2**self.cfg.levels
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"Segmenter: H and W must be divisible by {f}, got {tuple(x.shape[-2:])}")
        h = self.stem(x)  # (B, w, H, W)
        skips = [h]
        for down in self.down:
            h = down(h)
            skips.append(h)
        skips.pop()
        for i in reversed(range(self.cfg.levels)):
            h = self.up_conv[i](F.interpolate(h, scale_factor=2.0, mode="nearest")) + skips[i]
            h = self.up_block[i](h)
        return self.head(h), h.mean((2, 3))  # (B, C, H, W), (B, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """-> (B, H, W) int64 class ids."""
        return self.forward(x).argmax(1)


def save_segmenter(model: Segmenter, out_dir: str, meta: dict | None = None) -> str:
    """Write model.safetensors + config.json into out_dir (atomically, through a temporary directory)."""
    from safetensors.torch import save_file

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"type": CONFIG_TYPE, "config": dataclasses.asdict(model.cfg), "meta": meta or {}}, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def load_segmenter(path: str, device: torch.device | str = "cpu") -> tuple[Segmenter, dict]:
    """-> (frozen model in eval mode, meta). `path` is the directory save_segmenter wrote."""
    from safetensors.torch import load_file

    weights, config = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
    for p in (weights, config):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"segmenter file {p} not found: train one with `python recipes/train_segmenter.py --out {path}` "
                "(a few CPU minutes on the synthetic scenes) and pass that directory"
            )
    with open(config) as f:
        blob = json.load(f)
    if blob.get("type") != CONFIG_TYPE:
        raise ValueError(f"{config} holds a {blob.get('type')!r} config, expected {CONFIG_TYPE}")
    known = {f.name for f in dataclasses.fields(SegmenterConfig)}
    unknown = sorted(set(blob["config"]) - known)
    if unknown:
        raise ValueError(f"{config}: unknown segmenter config keys {unknown}")
    model = Segmenter(SegmenterConfig(**blob["config"]))
    tensors = load_file(weights)
    own = model.state_dict()
    bad = sorted(set(own) ^ set(tensors)) + [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if bad:
        raise ValueError(f"{weights} does not match its config.json (e.g. {bad[:4]})")
    model.load_state_dict(tensors)
    return model.to(device).eval().requires_grad_(False), blob.get("meta", {})


__all__ = ["SegmenterConfig", "Segmenter", "save_segmenter", "load_segmenter"]
