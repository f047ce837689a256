"""Unified label space: every source id maps to one class or ignore; same things share one id; table is current."""

import csv
import os

import numpy as np
import pytest

from svq_fast.data import labels
from svq_fast.data.labels import build_table

HERE = os.path.dirname(labels.__file__)


def _names(csv_name, id_col="id"):
    with open(os.path.join(HERE, csv_name), newline="") as f:
        return {r["name"]: int(r[id_col]) for r in csv.DictReader(f)}


ADE = _names("ade20k_150.csv")
COCO_PNG = _names("cocostuff_182.csv", "png_value")
CS = _names("cityscapes_labels.csv")
CS_TRAIN = _names("cityscapes_labels.csv", "train_id")


def test_count_printed_and_table_up_to_date(capsys):
    assert build_table.main(["--check"]) == 0, "unified.csv is stale: python -m svq_fast.data.labels.build_table"
    out = capsys.readouterr().out
    assert f"{labels.NUM_CLASSES} classes" in out
    print(f"\nunified label space: {labels.NUM_CLASSES} classes + ignore (paper: 243 counting 'unlabeled')")
    assert 200 < labels.NUM_CLASSES < 255
    assert len(labels.CLASS_NAMES) == labels.NUM_CLASSES == len(set(labels.CLASS_NAMES))


@pytest.mark.parametrize(
    "dataset, valid",
    [
        ("ade20k", list(range(0, 151))),
        ("cityscapes", list(range(0, 34))),
        ("cityscapes_train", list(range(0, 19)) + [255]),
        ("cocostuff", list(range(0, 182)) + [255]),
        ("unified", None),
        ("synthetic", list(range(16)) + [255]),
    ],
)
def test_every_source_id_maps_to_one_class_or_ignore(dataset, valid):
    lut, known = labels.lut(dataset), labels.known(dataset)
    if valid is None:
        valid = list(range(labels.NUM_CLASSES)) + [255]
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert sorted(np.flatnonzero(known).tolist()) == valid, "known raw values differ from the dataset's id range"
    n = labels.get_space("synthetic" if dataset == "synthetic" else "unified").num_classes
    for raw in valid:
        assert lut[raw] < n or lut[raw] == labels.IGNORE, (dataset, raw, lut[raw])
    # each raw value is listed exactly once in the table (the loader raises on a duplicate); count rows here too
    if dataset in ("ade20k", "cityscapes", "cityscapes_train", "cocostuff"):
        listed = [v for r in labels.read_table() for v in r[dataset]]
        assert len(listed) == len(set(listed)) == len(valid)


def test_ignore_conventions():
    assert labels.lut("ade20k")[0] == 255  # other
    assert labels.lut("cocostuff")[255] == 255  # unlabeled
    assert labels.lut("cityscapes_train")[255] == 255
    for name in ("unlabeled", "ego vehicle", "parking", "guard rail", "polegroup", "trailer"):
        assert labels.lut("cityscapes")[CS[name]] == 255, name
    # the 19 evaluation classes are all real classes
    for name, tid in CS_TRAIN.items():
        if 0 <= tid < 19:
            assert labels.lut("cityscapes")[CS[name]] < labels.NUM_CLASSES
            assert labels.lut("cityscapes_train")[tid] == labels.lut("cityscapes")[CS[name]]


# (ADE20k name, Cityscapes name or None, COCO-Stuff names)
SAME_THING = [
    ("car", "car", ["car"]),
    ("person", "person", ["person"]),
    ("sky", "sky", ["sky-other", "clouds"]),
    ("road", "road", ["road"]),
    ("building", "building", ["building-other"]),
    ("tree", "vegetation", ["tree"]),
    ("grass", "terrain", ["grass"]),
    ("bicycle", "bicycle", ["bicycle"]),
    ("minibike", "motorcycle", ["motorcycle"]),
    ("wall", "wall", ["wall-brick", "wall-other", "wall-wood"]),
    ("sidewalk", "sidewalk", ["pavement"]),
    ("sofa", None, ["couch"]),
    ("table", None, ["table", "dining table"]),
    ("floor", None, ["floor-wood", "floor-other"]),
]


@pytest.mark.parametrize("ade, cs, cocos", SAME_THING)
def test_same_thing_shares_one_id(ade, cs, cocos):
    uid = labels.lut("ade20k")[ADE[ade]]
    assert uid < labels.NUM_CLASSES
    if cs is not None:
        assert labels.lut("cityscapes")[CS[cs]] == uid
        assert labels.lut("cityscapes_train")[CS_TRAIN[cs]] == uid
    for c in cocos:
        assert labels.lut("cocostuff")[COCO_PNG[c]] == uid, c


def test_different_things_stay_apart():
    coco = labels.lut("cocostuff")
    assert coco[COCO_PNG["dog"]] != coco[COCO_PNG["cat"]]
    assert coco[COCO_PNG["dog"]] != labels.lut("ade20k")[ADE["animal"]]
    assert labels.lut("ade20k")[ADE["stairs"]] != labels.lut("ade20k")[ADE["stairway"]]
    assert labels.lut("cityscapes")[CS["rider"]] != labels.lut("cityscapes")[CS["person"]]
    assert labels.CLASS_NAMES[labels.lut("cityscapes")[CS["rider"]]] == "rider"


def test_remap_flags_unknown_values():
    raw = np.array([[0, 21], [3, 200]], np.uint8)
    out, unknown = labels.remap(raw, "ade20k")
    assert unknown == [200]
    out, unknown = labels.remap(raw[:, :1], "ade20k")
    assert unknown == [] and out[0, 0] == 255 and out[1, 0] == labels.lut("ade20k")[3]
    _, unknown = labels.remap(np.array([[300, 1]], np.int32), "ade20k")  # 16-bit map
    assert unknown == [300]


def test_palette_and_colorize():
    pal = labels.PALETTE
    assert pal.shape == (labels.NUM_CLASSES, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal}) == labels.NUM_CLASSES, "palette colours must be distinct"
    lab = np.array([[0, 1], [255, labels.NUM_CLASSES - 1]])
    rgb = labels.colorize(lab)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[1, 0] == 0).all() and (rgb[0, 0] == pal[0]).all()
    syn = labels.colorize(np.arange(16).reshape(4, 4), "synthetic")
    assert len({tuple(c) for c in syn.reshape(-1, 3)}) == 16
