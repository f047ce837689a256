"""svq_fast.app.maps: painted grids and uploaded PNGs become exact class ids, and every bad map is refused with a
message that says what is wrong."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from svq_fast.app.maps import MapError, decode_grid, decode_png, encode_grid, palette_for, png_bytes, read_png
from svq_fast.data.labels import get_space

PAL = palette_for(16)


def _png(array, mode=None, palette=None):
    img = Image.fromarray(np.asarray(array, np.uint8), mode) if mode else Image.fromarray(np.asarray(array))
    if palette is not None:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _label(size=8, seed=0):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 16, (size, size)).astype(np.uint8)
    lab[0, 0] = 255
    return lab


def test_palettes_follow_the_label_space():
    assert PAL.space == "synthetic" and PAL.names[2] == "grass" and PAL.colours.shape == (16, 3)
    unified = get_space("unified")
    pu = palette_for(unified.num_classes)
    assert pu.space == "unified" and pu.names == unified.names
    generic = palette_for(5)
    assert generic.space == "generic" and generic.names == tuple(f"class_{i}" for i in range(5))
    lut = PAL.lut()
    assert (lut[255] == 0).all() and (lut[16] == 255).all() and (lut[3] == PAL.colours[3]).all()


def test_grid_round_trip_is_exact():
    lab = _label(32)
    assert (decode_grid(encode_grid(lab), 32, PAL) == lab).all()


@pytest.mark.parametrize(
    "payload, match",
    [
        ("", "no map"),
        ("not base64!", "not valid base64"),
        (base64.b64encode(bytes(10)).decode(), "has 10 pixels, this model takes 32x32 = 1024"),
        (base64.b64encode(bytes([3] * 1023 + [77])).decode(), r"ids outside this model's label space: 77 \(1 pixels\)"),
        (base64.b64encode(bytes([16] * 1024)).decode(), "valid ids are 0..15"),
    ],
)
def test_grid_errors(payload, match):
    with pytest.raises(MapError, match=match):
        decode_grid(payload, 32, PAL)


def test_png_modes_read_as_ids():
    lab = _label(8)
    assert (decode_png(_png(lab, "L"), 8, PAL) == lab).all()
    grey = list(range(256)) * 3
    assert (decode_png(_png(lab, "P", grey), 8, PAL) == lab).all()  # palette indices are the ids
    rgb = PAL.colorize(lab)
    assert (decode_png(_png(rgb), 8, PAL) == lab).all()  # exact palette colours map back
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], -1)
    assert (decode_png(_png(rgba), 8, PAL) == lab).all()
    assert (read_png(png_bytes(lab)) == lab).all()


def test_png_errors():
    lab = _label(8)
    jpeg = io.BytesIO()
    Image.fromarray(PAL.colorize(lab)).save(jpeg, format="JPEG")
    off = PAL.colorize(lab).copy()
    off[2, 3] = (1, 2, 3)
    bad_ids = lab.copy()
    bad_ids[1, 1] = 200
    cases = [
        (b"", "is empty"),
        (b"hello", "not a PNG"),
        (jpeg.getvalue(), "not a PNG"),
        (png_bytes(lab)[:40], "not a readable PNG"),
        (_png(_label(16), "L"), "is 16x16; this model paints 8x8"),
        (_png(bad_ids, "L"), "outside this model's label space: 200"),
        (_png(off), r"1 colours that are not this model's class colours \(#010203\)"),
        (_png(np.zeros((8, 8, 2), np.uint8)), "PNG mode LA"),
    ]
    for data, match in cases:
        with pytest.raises(MapError, match=match):
            decode_png(data, 8, PAL)
