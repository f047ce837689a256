"""Label maps from users' files (svq_fast/data/label_files.py): every mode it reads, every bad input it names, and
the ADE20k path through the table make_shards converts the dataset with (a small fixture made here)."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from svq_fast.data import labels
from svq_fast.data.convert import ConvertSpec, process_item
from svq_fast.data.label_files import (
    LabelFileError,
    MapSpec,
    list_label_files,
    read_label_file,
    space_spec,
)

SYN = space_spec(16, factor=4, min_size=8)


def _label(h=8, w=12, seed=0):
    return np.random.default_rng(seed).integers(0, 16, (h, w)).astype(np.uint8)


def _save(path, array, mode=None, palette=None):
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)
    return str(path)


def test_modes_read_as_ids(tmp_path):
    lab = _label()
    assert (read_label_file(_save(tmp_path / "l.png", lab), SYN) == lab).all()
    p = Image.fromarray(lab, "L").convert("P")
    p.putpalette(list(range(256)) * 3)
    p.save(tmp_path / "p.png")
    assert (read_label_file(str(tmp_path / "p.png"), SYN) == lab).all()  # palette indices are the ids
    Image.fromarray(lab.astype(np.uint16)).save(tmp_path / "i16.png")
    assert (read_label_file(str(tmp_path / "i16.png"), SYN) == lab).all()
    rgb = labels.get_space("synthetic").colorize(lab)
    assert (read_label_file(_save(tmp_path / "rgb.png", rgb), SYN) == lab).all()
    rgba = np.concatenate([rgb, np.full((*lab.shape, 1), 255, np.uint8)], -1)
    assert (read_label_file(_save(tmp_path / "rgba.png", rgba), SYN) == lab).all()
    ignore = lab.copy()
    ignore[0] = 255
    assert (read_label_file(_save(tmp_path / "ign.png", ignore), SYN) == ignore).all()


def _bad_files(tmp_path):
    lab = _label()
    unknown = lab.copy()
    unknown[1, 1] = 200
    off = labels.get_space("synthetic").colorize(lab).copy()
    off[2, 3] = (1, 2, 3)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"hello, not an image")
    full = io.BytesIO()
    Image.fromarray(lab).save(full, format="PNG")
    (tmp_path / "cut.png").write_bytes(full.getvalue()[:40])
    return [
        (_save(tmp_path / "unknown.png", unknown), r"ids outside this model's label space: 200 \(1 pixels\)"),
        (_save(tmp_path / "off.png", off), r"1 colours that are not this model's class colours \(#010203\)"),
        (_save(tmp_path / "la.png", np.zeros((8, 12, 2), np.uint8)), "PNG mode LA"),
        (_save(tmp_path / "ignore.png", np.full((8, 12), 255, np.uint8)), "empty label map"),
        (
            _save(tmp_path / "odd.png", _label(10, 12)),
            r"10x12 pixels .*multiples of .* factor 4 \(e.g. crop it to 8x12",
        ),
        (_save(tmp_path / "small.png", _label(4, 12)), "at least 8x8"),
        (str(tmp_path / "empty.png"), "is empty"),
        (str(tmp_path / "text.png"), "is not a PNG"),
        (str(tmp_path / "cut.png"), "is not a readable PNG"),
        (str(tmp_path / "missing.png"), "cannot be read"),
    ]


def test_every_bad_input_is_named(tmp_path):
    for path, match in _bad_files(tmp_path):
        with pytest.raises(LabelFileError, match=match) as e:
            read_label_file(path, SYN)
        assert path in str(e.value)  # the message names the file


def test_a_pixel_limit(tmp_path):
    spec = space_spec(16, factor=4, min_size=8, max_pixels=8 * 8)
    with pytest.raises(LabelFileError, match="8x12 = 96 pixels; the limit is 64"):
        read_label_file(_save(tmp_path / "big.png", _label()), spec)


def test_ade20k_ids_go_through_the_converters_table(tmp_path):
    """An ADE20k annotation (ADE's own ids, 0 = other) reads as the unified map make_shards writes for it."""
    rng = np.random.default_rng(1)
    raw = rng.choice([0, 1, 3, 13, 21, 87, 150], size=(16, 20)).astype(np.uint8)
    path = _save(tmp_path / "ADE_val_00000001.png", raw)
    spec = space_spec(labels.NUM_CLASSES, from_dataset="ade20k", factor=4)
    got = read_label_file(path, spec)
    item = SimpleNamespace(id="ADE_val_00000001", load=lambda: (np.zeros((16, 20, 3), np.uint8), raw, {}))
    res = process_item(ConvertSpec(dataset="ade20k", split="val", label_table="ade20k", size=0), item)
    written = np.asarray(Image.open(io.BytesIO(dict(res["members"])["ADE_val_00000001.label.png"])))
    assert res["ok"] and (got == written).all()
    assert (got[raw == 0] == labels.IGNORE).all() and not (got == raw).all()  # remapped, not read as unified ids
    bad = raw.copy()
    bad[0, 0] = 200  # no ADE20k class
    with pytest.raises(LabelFileError, match="unknown to the ade20k table: 200"):
        read_label_file(_save(tmp_path / "bad.png", bad), spec)
    with pytest.raises(LabelFileError, match="read as raw ids"):
        read_label_file(_save(tmp_path / "rgb.png", np.zeros((16, 20, 3), np.uint8)), spec)
    with pytest.raises(ValueError, match="from_dataset must be one of"):
        MapSpec(num_classes=3, colours=np.zeros((3, 3), np.uint8), from_dataset="ade")


def test_inputs_a_file_a_folder_and_a_list(tmp_path):
    (tmp_path / "maps").mkdir()
    for name in ("b.png", "a.png", "notes.txt"):
        (tmp_path / "maps" / name).write_bytes(b"x")
    assert list_label_files(str(tmp_path / "maps")) == [str(tmp_path / "maps" / n) for n in ("a.png", "b.png")]
    assert list_label_files(str(tmp_path / "maps" / "b.png")) == [str(tmp_path / "maps" / "b.png")]
    (tmp_path / "list.txt").write_text("# my maps\nmaps/b.png\n\n/abs/c.png\n")
    assert list_label_files(str(tmp_path / "list.txt")) == [str(tmp_path / "maps" / "b.png"), "/abs/c.png"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "none.txt").write_text("# nothing\n")
    for path, match in [("empty", "without .png files"), ("none.txt", "lists no files"), ("nope", "does not exist")]:
        with pytest.raises(LabelFileError, match=match):
            list_label_files(str(tmp_path / path))
