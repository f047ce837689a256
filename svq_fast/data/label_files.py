"""Label maps from users' files: the one reader of label PNGs for sampling (recipes/sample.py --maps) and the
synthesis page's uploads (svq_fast/app/maps.py).

A map is an (H, W) uint8 array of class ids 0..C-1 of the model's label space, or `ignore` (255). A PNG is read as:
- mode L or P: the pixel values / palette indices are the ids; mode I / I;16: the same, 16-bit (values above 255
  are unknown ids);
- RGB / RGBA: colours of the label space's palette, exact matches only (no nearest colour);
- with from_dataset (ade20k, cityscapes, cityscapes_train, cocostuff): the values are that dataset's raw ids and go
  through svq_fast.data.labels.remap, the table `make_shards` converts the dataset with, to the unified space.
Every problem is a LabelFileError whose message names the file and what is wrong (unreadable or empty file, not a
PNG, wrong mode, unknown ids, all pixels ignore, a size the model cannot take), so a caller can report it and go on
with the other files.

Inputs (list_label_files): one PNG, a folder (its *.png, sorted; not recursive), or a .txt list (one path a line,
relative to the list's folder; blank lines and lines starting with # are skipped).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

from svq_fast.data import labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASETS = ("ade20k", "cityscapes", "cityscapes_train", "cocostuff")  # raw ids remapped by labels.remap


class LabelFileError(ValueError):
    """A label map that cannot be used; the message names the file (or upload) and what is wrong."""


@dataclass(frozen=True, kw_only=True)
class MapSpec:
    """What a map must be for one model: its label space (class count, palette colours, name for messages), the raw
    dataset the files' ids come from ("" = ids of the space itself), and size rules: both sides multiples of
    `factor` and at least `min_size`, at most `max_pixels` pixels (0 = no limit)."""

    num_classes: int
    colours: np.ndarray  # (num_classes, 3) uint8
    space: str = "synthetic"
    ignore: int = labels.IGNORE
    from_dataset: str = ""
    factor: int = 1
    min_size: int = 1
    max_pixels: int = 0

    def __post_init__(self):
        if self.from_dataset and self.from_dataset not in DATASETS:
            raise ValueError(f"from_dataset must be one of {DATASETS}, got {self.from_dataset!r}")


def check_ids(label: np.ndarray, spec: MapSpec, what: str) -> np.ndarray:
    """-> label as uint8 if every id is a class or ignore; LabelFileError naming the offending ids otherwise."""
    label = np.asarray(label)
    valid = (label >= 0) & ((label < spec.num_classes) | (label == spec.ignore))
    if not bool(valid.all()):
        bad = np.unique(label[~valid])
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise LabelFileError(
            f"{what} has ids outside this model's label space: {shown} ({int((~valid).sum())} pixels); "
            f"valid ids are 0..{spec.num_classes - 1} ({spec.space} classes) and {spec.ignore} (ignore)"
        )
    return label.astype(np.uint8)


def ids_from_colours(rgb: np.ndarray, spec: MapSpec, what: str) -> np.ndarray:
    """(H, W, 3) uint8 in the space's palette colours -> ids; any other colour is an error (no nearest match).
    Ignore is black; a colour shared by two classes resolves to the lower id."""
    lut = np.full((256, 3), 255, np.uint8)
    lut[: spec.num_classes] = spec.colours
    lut[spec.ignore] = 0
    ids = list(range(spec.num_classes)) + [spec.ignore]
    key = lambda c: (c[..., 0].astype(np.int64) << 16) | (c[..., 1].astype(np.int64) << 8) | c[..., 2]  # noqa: E731
    table = {int(key(lut[i])): i for i in reversed(ids)}
    codes = key(rgb)
    uniq, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(u) for u in uniq if int(u) not in table]
    if unknown:
        shown = ", ".join(f"#{u:06x}" for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise LabelFileError(
            f"{what} is an RGB image with {len(unknown)} colours that are not this model's class colours ({shown}); "
            "use a PNG of class ids (mode L or P), or one painted in the model's palette exactly"
        )
    return np.asarray([table[int(u)] for u in uniq], np.uint8)[inverse.reshape(codes.shape)]


def open_png(data: bytes, what: str):
    """PNG bytes -> a loaded PIL image; LabelFileError if empty, not a PNG or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise LabelFileError(f"{what} is empty")
    if not data.startswith(PNG_MAGIC):
        raise LabelFileError(f"{what} is not a PNG file: use a PNG whose pixel values are class ids")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise LabelFileError(f"{what} is not a readable PNG ({e})") from None
    return img


def ids_from_image(img, spec: MapSpec, what: str) -> np.ndarray:
    """A loaded PIL image -> (H, W) uint8 ids of the spec's space (see the module docstring for the modes)."""
    if img.mode in ("L", "P"):
        raw = np.asarray(img)
    elif img.mode in ("I", "I;16", "I;16B", "I;16L"):
        raw = np.asarray(img.convert("I"))
    elif img.mode in ("RGB", "RGBA"):
        if spec.from_dataset:
            raise LabelFileError(
                f"{what} is an RGB image; {spec.from_dataset} annotations are read as raw ids (mode L, P or I): "
                "pass the id PNG, not a colour rendering"
            )
        return ids_from_colours(np.asarray(img.convert("RGB")), spec, what)
    else:
        raise LabelFileError(
            f"{what} has PNG mode {img.mode}; expected 8-bit class ids (mode L or P) or palette colours (RGB)"
        )
    if not spec.from_dataset:
        return check_ids(raw, spec, what)
    label, unknown = labels.remap(raw, spec.from_dataset)  # the table make_shards converts the dataset with
    if unknown:
        shown = ", ".join(map(str, unknown[:12])) + (", ..." if len(unknown) > 12 else "")
        raise LabelFileError(f"{what} has label ids unknown to the {spec.from_dataset} table: {shown}")
    return label


def check_size(label: np.ndarray, spec: MapSpec, what: str) -> np.ndarray:
    """Size rules of the spec; -> label. The message says which side is wrong and a size that would do."""
    h, w = label.shape
    f = spec.factor
    if h % f or w % f:
        raise LabelFileError(
            f"{what} is {h}x{w} pixels (height x width); both sides must be multiples of the model's downsampling "
            f"factor {f} (e.g. crop it to {h - h % f}x{w - w % f})"
        )
    if h < spec.min_size or w < spec.min_size:
        raise LabelFileError(
            f"{what} is {h}x{w} pixels; this model samples maps of at least {spec.min_size}x{spec.min_size} "
            "(its training size; larger maps are sampled by a sliding window)"
        )
    if spec.max_pixels and h * w > spec.max_pixels:
        raise LabelFileError(f"{what} is {h}x{w} = {h * w} pixels; the limit is {spec.max_pixels}")
    return label


def check_not_empty(label: np.ndarray, spec: MapSpec, what: str) -> np.ndarray:
    if not bool((label != spec.ignore).any()):
        raise LabelFileError(f"{what} is an empty label map (all pixels ignore, {spec.ignore})")
    return label


def read_label_file(path: str, spec: MapSpec) -> np.ndarray:
    """One label PNG -> (H, W) uint8 ids, checked (ids, not empty, size); LabelFileError names `path`."""
    what = path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LabelFileError(f"{what} cannot be read ({e.strerror or e})") from None
    label = ids_from_image(open_png(data, what), spec, what)
    return check_size(check_not_empty(label, spec, what), spec, what)


def list_label_files(path: str) -> list[str]:
    """A PNG, a folder of PNGs or a .txt list -> the PNG paths in order. Entries of a list are not opened here (a
    missing one fails when it is read, beside the others); an input that names no file at all is an error."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(".png"))
        if not files:
            raise LabelFileError(f"{path} is a folder without .png files")
        return files
    if not os.path.exists(path):
        raise LabelFileError(f"{path} does not exist (give a label PNG, a folder of them or a .txt list)")
    if path.lower().endswith(".txt"):
        base = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            lines = [ln.strip() for ln in f]
        files = [os.path.join(base, ln) for ln in lines if ln and not ln.startswith("#")]
        if not files:
            raise LabelFileError(f"{path} lists no files")
        return files
    return [path]


def space_spec(num_classes: int, **kw) -> MapSpec:
    """The MapSpec of a model with num_classes classes (labels.space_for: synthetic, unified or generic)."""
    space = labels.space_for(num_classes)
    kind = space.name if space.name in ("synthetic", "unified") else "generic"
    return MapSpec(num_classes=num_classes, colours=np.asarray(space.palette, np.uint8), space=kind, **kw)
