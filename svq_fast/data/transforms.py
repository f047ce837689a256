"""Per-sample joint transforms of (image, label) and batch collation.

A sample's crop and flip come from 3 floats in [0, 1) drawn by the stream (seeded per block), so a sample's
transform never depends on what was read before it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate, get_worker_info

from svq_fast.data.faults import EVENTS

NUM_PARAMS = 3  # crop top, crop left, flip coin


def joint_transform(
    image: np.ndarray,
    label: np.ndarray,
    size: int,
    params: np.ndarray,
    flip: bool,
    crop: str = "random",
) -> tuple[np.ndarray, np.ndarray]:
    """The same crop to `size` and horizontal flip for image (H, W, 3) and label (H, W).
    params: 3 floats in [0, 1) (crop top, crop left, flip coin). A sample smaller than `size` is first resized
    (shorter side to size; bicubic image, nearest label)."""
    h, w = label.shape
    if min(h, w) < size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        h, w = nh, nw
    if crop == "random":
        top, left = int(params[0] * (h - size + 1)), int(params[1] * (w - size + 1))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    image = image[top : top + size, left : left + size]
    label = label[top : top + size, left : left + size]
    if flip and params[2] < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return image, label


PIXEL_SCALE = (
    1 / 127.5
)  # uint8 pixel v -> v * PIXEL_SCALE - 1 in [-1, 1] (here for float batches, on the device for raw)


def to_tensors(image: np.ndarray, label: np.ndarray, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image (3, H, W) float in [-1, 1], label (H, W) int64; raw=True: image (3, H, W) uint8 and label (H, W)
    uint8 as decoded, a quarter / an eighth of the bytes through worker shared memory and the host-to-device copy
    (normalise on the device with `normalize_on_device`). The float arithmetic is done in numpy: torch's intra-op
    threads make these small per-sample ops many times slower in the main process (num_workers=0)."""
    if raw:
        x = np.ascontiguousarray(np.transpose(image, (2, 0, 1)), dtype=np.uint8)
        return torch.from_numpy(x), torch.from_numpy(np.array(label, np.uint8))
    x = np.ascontiguousarray(np.transpose(image, (2, 0, 1)), dtype=np.float32)
    x *= PIXEL_SCALE
    x -= 1.0
    return torch.from_numpy(x), torch.from_numpy(np.array(label, np.int64))


def normalize_on_device(
    batch: dict, dev: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's images and labels on `dev`: (B, 3, H, W) `dtype` in [-1, 1] and (B, H, W) int64, from raw uint8
    batches (copied without blocking the host; pinned by the loader on GPU runs) or from float ones. The raw path's
    arithmetic matches to_tensors' numpy (float32 multiply by PIXEL_SCALE, then subtract 1) bit for bit."""
    image, label = batch["image"], batch["label"]
    image = image.to(dev, non_blocking=True)
    if image.dtype == torch.uint8:
        image = image.float().mul_(PIXEL_SCALE).sub_(1.0)
    return image.to(dtype), label.to(dev, non_blocking=True).long()


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch; the samples' fault events are concatenated into batch[EVENTS] (a list).
    In a worker: torch's default collate (it stacks straight into shared memory; workers run one intra-op
    thread). In the main process (num_workers=0): numpy's stack, because torch.stack with several intra-op
    threads was measured 10-40x slower per batch on a 2-vCPU VM."""
    events = [e for s in samples for e in s.get(EVENTS, ())]
    samples = [{k: v for k, v in s.items() if k != EVENTS} for s in samples]
    if get_worker_info() is not None:
        batch = default_collate(samples)
    else:
        batch = {}
        for name, first in samples[0].items():
            column = [s[name] for s in samples]
            if isinstance(first, torch.Tensor):
                batch[name] = torch.from_numpy(np.stack([t.numpy() for t in column]))
            elif isinstance(first, bool):
                batch[name] = torch.tensor(column, dtype=torch.bool)
            else:
                batch[name] = column
    batch[EVENTS] = events
    return batch
