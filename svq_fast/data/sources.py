"""Where each dataset keeps its images and label maps on disk: listing (image, label) pairs of one split.

    ade20k      ROOT[/ADEChallengeData2016]/images/{training,validation}/X.jpg
                ROOT[/ADEChallengeData2016]/annotations/{training,validation}/X.png            (values 0..150)
    cityscapes  ROOT/leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png
                ROOT/gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png               (labelIds 0..33)
    cocostuff   ROOT[/dataset]/images/{train2017,val2017}/X.jpg
                ROOT[/dataset]/annotations/{train2017,val2017}/X.png                     (id - 1, 255 = unlabeled)
    folder      ROOT/images[/{split}]/X.{jpg,jpeg,png,bmp,webp} + ROOT/labels[/{split}]/X.png   (unified ids)

An image whose label file is missing is still listed (label path that does not exist), so the converter can
report it as a reject instead of dropping it silently.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")  # single-channel integer maps


class Reject(Exception):
    """This input is skipped; the message is the reason written to rejects.jsonl."""


@dataclass(frozen=True)
class Item:
    """One input sample: `id` is the original file id (unique within the split), paths are absolute."""

    id: str
    image: str
    label: str

    def load(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """-> (image (H, W, 3) uint8, raw label map (H, W) int, meta). Raises Reject naming what is wrong."""
        try:
            with Image.open(self.image) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise Reject(f"unreadable image ({type(e).__name__}: {e})") from None
        if not os.path.exists(self.label):
            raise Reject(f"missing label file {self.label}")
        try:
            with Image.open(self.label) as lb:
                lb.load()
                mode = lb.mode
                raw = np.asarray(lb) if mode in LABEL_MODES else None
        except Exception as e:
            raise Reject(f"unreadable label ({type(e).__name__}: {e})") from None
        if raw is None:
            raise Reject(f"label has mode {mode}, expected a single-channel id map (L or P)")
        if raw.shape != image.shape[:2]:
            raise Reject(f"size mismatch: image {image.shape[1]}x{image.shape[0]}, label {raw.shape[1]}x{raw.shape[0]}")
        meta = {"file": os.path.basename(self.image), "orig_size": [int(image.shape[0]), int(image.shape[1])]}
        return image, raw, meta


# dataset -> the label table (svq_fast.data.labels.lut name) its raw maps go through
LABEL_TABLE = {"ade20k": "ade20k", "cityscapes": "cityscapes", "cocostuff": "cocostuff", "folder": "unified"}
DATASETS = tuple(LABEL_TABLE)


def _need_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: expected the directory {path}")
    return path


def _first_existing(*paths: str) -> str:
    return next((p for p in paths if os.path.isdir(p)), paths[0])


def list_ade20k(root: str, split: str) -> list[Item]:
    base = _first_existing(os.path.join(root, "ADEChallengeData2016"), root)
    sub = {"train": "training", "val": "validation"}.get(split, split)
    img_dir = _need_dir(os.path.join(base, "images", sub), "ADE20k images")
    ann_dir = os.path.join(base, "annotations", sub)
    items = []
    for path in sorted(glob.glob(os.path.join(img_dir, "*"))):
        stem, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() in IMAGE_EXTS:
            items.append(Item(stem, path, os.path.join(ann_dir, stem + ".png")))
    return items


def list_cityscapes(root: str, split: str) -> list[Item]:
    img_dir = _need_dir(os.path.join(root, "leftImg8bit", split), "Cityscapes images")
    items = []
    for path in sorted(glob.glob(os.path.join(img_dir, "*", "*_leftImg8bit.png"))):
        city = os.path.basename(os.path.dirname(path))
        stem = os.path.basename(path)[: -len("_leftImg8bit.png")]
        label = os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png")
        items.append(Item(stem, path, label))
    return items


def list_cocostuff(root: str, split: str) -> list[Item]:
    base = _first_existing(os.path.join(root, "dataset"), root)
    sub = {"train": "train2017", "val": "val2017"}.get(split, split)
    img_dir = _need_dir(os.path.join(base, "images", sub), "COCO-Stuff images")
    ann_dir = os.path.join(base, "annotations", sub)
    items = []
    for path in sorted(glob.glob(os.path.join(img_dir, "*"))):
        stem, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() in IMAGE_EXTS:
            items.append(Item(stem, path, os.path.join(ann_dir, stem + ".png")))
    return items


def list_folder(root: str, split: str) -> list[Item]:
    img_dir = _need_dir(os.path.join(root, "images"), "folder dataset images")
    lbl_dir = os.path.join(root, "labels")
    if os.path.isdir(os.path.join(img_dir, split)):
        img_dir, lbl_dir = os.path.join(img_dir, split), os.path.join(lbl_dir, split)
    items = []
    for path in sorted(glob.glob(os.path.join(img_dir, "*"))):
        stem, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() in IMAGE_EXTS:
            items.append(Item(stem, path, os.path.join(lbl_dir, stem + ".png")))
    return items


_LISTERS = {"ade20k": list_ade20k, "cityscapes": list_cityscapes, "cocostuff": list_cocostuff, "folder": list_folder}


def list_items(dataset: str, root: str, split: str) -> list[Item]:
    """Sorted (by id) items of `split`; raises FileNotFoundError naming the expected folder."""
    if dataset not in _LISTERS:
        raise KeyError(f"unknown dataset {dataset!r}; known: {', '.join(_LISTERS)}")
    items = _LISTERS[dataset](root, split)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{dataset} {split}: duplicate file ids under {root}")
    return sorted(items, key=lambda it: it.id)
