"""Label spaces: the unified space of ADE20k + Cityscapes + COCO-Stuff, and the synthetic scenes' own 16 classes.

The unified table is `unified.csv` beside this file (built by `python -m svq_fast.data.labels.build_table`,
which documents how classes were merged). Pixel values 0..N-1 are classes and 255 is ignore; every
dataset's raw pixel values map through a 256-entry uint8 look-up table:

    lut("ade20k")            ADEChallengeData2016 annotation PNG values (0 = other -> ignore, 1..150)
    lut("cityscapes")        gtFine *_labelIds.png values 0..33 (ids with train_id 255 -> ignore)
    lut("cityscapes_train")  train ids 0..18, 255 = ignore
    lut("cocostuff")         stuffthingmaps PNG values = COCO-Stuff id - 1 (0..181), 255 = unlabeled -> ignore
    lut("unified")           identity on 0..N-1 and 255 (labels already in the unified space)
    lut("synthetic")         identity on the synthetic scenes' 0..15 and 255

Raw values a dataset never uses (e.g. 200 in an ADE20k map) also map to 255 in the LUT, but `known(dataset)`
is False for them, so converters can reject such a file instead of silently ignoring it: use `remap`.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass

import numpy as np

IGNORE = 255
HERE = os.path.dirname(os.path.abspath(__file__))
TABLE_PATH = os.path.join(HERE, "unified.csv")
DATASETS = ("ade20k", "cityscapes", "cityscapes_train", "cocostuff", "unified", "synthetic")


@dataclass(frozen=True)
class LabelSpace:
    """Class names and a visualisation palette of one label space (ids 0..num_classes-1, 255 = ignore)."""

    name: str
    names: tuple[str, ...]
    palette: np.ndarray  # (num_classes, 3) uint8

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def colorize(self, label: np.ndarray) -> np.ndarray:
        """(H, W) int ids -> (H, W, 3) uint8 RGB; ignore is black, ids outside the space are white."""
        table = np.full((256, 3), 255, np.uint8)
        table[: self.num_classes] = self.palette
        table[IGNORE] = 0
        label = np.asarray(label)
        return table[np.clip(label, 0, 255).astype(np.intp)]


def make_palette(n: int, seed: int = 0) -> np.ndarray:
    """n distinct-looking colours: golden-ratio hue steps with cycling saturation and value, never black."""
    h = (np.arange(n) * 0.6180339887 + 0.05 * seed) % 1.0
    s = np.array([0.85, 0.55, 0.95, 0.7])[np.arange(n) % 4]
    v = np.array([0.95, 0.75, 0.6, 0.85, 0.5])[np.arange(n) % 5]
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = np.select(
        [i[:, None] == k for k in range(6)],
        [np.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))],
    )
    return np.clip(np.round(rgb * 255), 16, 255).astype(np.uint8)


@functools.cache
def read_table(path: str = TABLE_PATH) -> tuple[dict, ...]:
    """The unified table as rows {id, name, ade20k, cityscapes, cityscapes_train, cocostuff: list[int]}."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python -m svq_fast.data.labels.build_table`")
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {"id": int(r["id"]), "name": r["name"]}
            for col in ("ade20k", "cityscapes", "cityscapes_train", "cocostuff"):
                row[col] = [int(v) for v in r[col].split()]
            rows.append(row)
    return tuple(rows)


@functools.cache
def _unified() -> LabelSpace:
    rows = [r for r in read_table() if r["id"] != IGNORE]
    if [r["id"] for r in rows] != list(range(len(rows))):
        raise ValueError(f"{TABLE_PATH}: class ids must be 0..N-1 in order")
    return LabelSpace("unified", tuple(r["name"] for r in rows), make_palette(len(rows)))


@functools.cache
def _synthetic() -> LabelSpace:
    from svq_fast.data import synthetic

    return LabelSpace("synthetic", synthetic.CLASS_NAMES, synthetic.class_colours())


def get_space(name: str) -> LabelSpace:
    if name == "unified":
        return _unified()
    if name == "synthetic":
        return _synthetic()
    raise KeyError(f"unknown label space {name!r}; known: unified, synthetic")


@functools.cache
def space_for(num_classes: int) -> LabelSpace:
    """The label space of a model with `num_classes` classes: the synthetic or the unified one when the count
    matches, else generic names class_0.. with a generated palette."""
    for name in ("synthetic", "unified"):
        try:
            space = get_space(name)
        except FileNotFoundError:  # the unified table missing from an odd install: generic names then
            continue
        if space.num_classes == num_classes:
            return space
    return LabelSpace(
        f"generic{num_classes}", tuple(f"class_{i}" for i in range(num_classes)), make_palette(num_classes)
    )


@functools.cache
def _tables(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(lut (256,) uint8, known (256,) bool) for `dataset`'s raw pixel values."""
    lut = np.full(256, IGNORE, np.uint8)
    known = np.zeros(256, bool)
    if dataset in ("unified", "synthetic"):
        n = get_space(dataset).num_classes
        lut[:n] = np.arange(n, dtype=np.uint8)
        known[:n] = known[IGNORE] = True
        return lut, known
    if dataset not in DATASETS:
        raise KeyError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    for r in read_table():
        for raw in r[dataset]:
            if dataset == "cocostuff":  # table holds COCO-Stuff ids; the PNG holds id - 1, unlabeled (0) is 255
                raw = IGNORE if raw == 0 else raw - 1
            if known[raw]:
                raise ValueError(f"{TABLE_PATH}: {dataset} value {raw} is listed twice")
            lut[raw], known[raw] = r["id"], True
    lut.setflags(write=False)
    known.setflags(write=False)
    return lut, known


def lut(dataset: str) -> np.ndarray:
    """(256,) uint8: raw pixel value of `dataset` -> unified id (255 = ignore)."""
    return _tables(dataset)[0]


def known(dataset: str) -> np.ndarray:
    """(256,) bool: which raw pixel values `dataset`'s maps may contain."""
    return _tables(dataset)[1]


def remap(raw: np.ndarray, dataset: str) -> tuple[np.ndarray, list[int]]:
    """Raw label map -> (unified uint8 map, sorted raw values unknown to `dataset`; empty when all are known).
    Values above 255 (16-bit maps) are reported as unknown."""
    raw = np.asarray(raw)
    values = np.unique(raw)
    big = [int(v) for v in values if v < 0 or v > 255]
    small = values[(values >= 0) & (values <= 255)].astype(np.intp)
    unknown = sorted(big + [int(v) for v in small[~known(dataset)[small]]])
    if unknown:
        return np.full(raw.shape, IGNORE, np.uint8), unknown
    return lut(dataset)[raw.astype(np.intp)], []


def colorize(label: np.ndarray, space: str = "unified") -> np.ndarray:
    """(H, W) label ids -> (H, W, 3) uint8 RGB for viewing."""
    return get_space(space).colorize(label)


def __getattr__(name: str):  # module attributes built on first use (PEP 562)
    if name == "NUM_CLASSES":
        return _unified().num_classes
    if name == "CLASS_NAMES":
        return _unified().names
    if name == "PALETTE":
        return _unified().palette
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE",
    "DATASETS",
    "LabelSpace",
    "NUM_CLASSES",
    "CLASS_NAMES",
    "PALETTE",
    "get_space",
    "lut",
    "known",
    "remap",
    "colorize",
    "read_table",
    "make_palette",
]
