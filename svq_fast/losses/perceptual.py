"""LPIPS perceptual loss with every weight read from local files (nothing is downloaded).

The linear heads ship inside the `lpips` PyPI package (lpips/weights/v0.1/vgg.pth). The VGG-16 backbone is
torchvision's ImageNet checkpoint, read from `vgg_path` (e.g. vgg16-397923af.pth, fetched once by the user:
`python -c "import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')"` on a machine with network
puts it under ~/.cache/torch/hub/checkpoints/). Its `features.{i}.*` tensors map onto lpips' slices.
"""

from __future__ import annotations

import os

import torch
from torch import nn

# lpips splits torchvision's vgg16.features into five slices at these layer indices
_SLICES = [(1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30))]


def _slice_key(torchvision_key: str) -> str | None:
    """'features.10.weight' -> 'slice3.10.weight'; None for classifier keys."""
    parts = torchvision_key.split(".")
    if parts[0] != "features":
        return None
    idx = int(parts[1])
    for n, r in _SLICES:
        if idx in r:
            return f"slice{n}.{idx}.{parts[2]}"
    return None


def load_vgg_backbone(lpips_model: nn.Module, vgg_path: str) -> None:
    """Copy torchvision vgg16 features from `vgg_path` into an lpips.LPIPS(net='vgg') model, strictly."""
    state = torch.load(vgg_path, map_location="cpu", weights_only=True)
    mapped = {k2: v for k, v in state.items() if (k2 := _slice_key(k)) is not None}
    own = lpips_model.net.state_dict()
    if set(mapped) != set(own):
        missing = sorted(set(own) - set(mapped))[:4]
        raise ValueError(f"{vgg_path} is not a torchvision vgg16 checkpoint (missing e.g. {missing})")
    for k, v in mapped.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{vgg_path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    lpips_model.net.load_state_dict(mapped)


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance between two image batches in [-1, 1]; frozen, eval mode."""

    def __init__(self, vgg_path: str):
        super().__init__()
        import lpips

        if not os.path.exists(vgg_path):
            raise FileNotFoundError(
                f"LPIPS VGG-16 backbone not found at {vgg_path!r}. Put torchvision's vgg16 ImageNet checkpoint "
                "(vgg16-397923af.pth) there, or set loss.perceptual_weight=0."
            )
        self.model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        load_vgg_backbone(self.model, vgg_path)
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always eval: dropout in the heads stays off
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.float(), y.float()).mean()


def build_perceptual(weight: float, vgg_path: str) -> LPIPSLoss | None:
    """The LPIPS loss when weight > 0, else None. A requested loss that cannot be built is an error naming the
    file: training silently without it would be a different run from the one asked for."""
    if weight <= 0:
        return None
    if not vgg_path or not os.path.isfile(vgg_path):
        raise FileNotFoundError(
            f"loss.perceptual_weight={weight} needs the VGG-16 backbone file, but "
            f"{repr(vgg_path) if vgg_path else 'loss.lpips_vgg_path (unset)'} is not a file: point "
            "--loss.lpips_vgg_path at torchvision's vgg16-397923af.pth, or pass --loss.perceptual_weight=0"
        )
    return LPIPSLoss(vgg_path)
