"""Label maps in and out of the synthesis page: the model's class palette, and exact validation of every map that
arrives (a painted grid, an uploaded PNG) before it reaches the model.

A map is an (H, W) uint8 array of class ids 0..C-1, or `ignore` (255) for unlabeled pixels. The page paints on such
a grid and sends its raw bytes, so no colour is ever read back from a canvas; PNGs are read as ids (mode L or P:
the pixel values / palette indices are the ids) or, for RGB(A), mapped back through the model's palette with exact
colour matches only (the reading is svq_fast.data.label_files', shared with recipes/sample.py --maps). Everything
that is wrong raises MapError with a sentence the page shows as it is.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np

from svq_fast.data import label_files
from svq_fast.data.label_files import LabelFileError, MapSpec
from svq_fast.data.labels import IGNORE, space_for

MAX_UPLOAD_BYTES = 8 << 20


class MapError(ValueError):
    """A label map the model cannot take; the message is for the person who sent it."""


@dataclass(frozen=True)
class ClassPalette:
    """Names and display colours of a model's label space (ids 0..C-1, plus `ignore`)."""

    space: str  # "synthetic", "unified" or "generic"
    names: tuple[str, ...]
    colours: np.ndarray  # (C, 3) uint8
    ignore: int = IGNORE

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def lut(self) -> np.ndarray:
        """(256, 3) uint8: class colours, ignore black, ids outside the space white."""
        table = np.full((256, 3), 255, np.uint8)
        table[: self.num_classes] = self.colours
        table[self.ignore] = 0
        return table

    def colorize(self, label: np.ndarray) -> np.ndarray:
        """(H, W) ids -> (H, W, 3) uint8."""
        return self.lut()[np.asarray(label, np.uint8)]

    def to_json(self) -> dict:
        return {
            "space": self.space,
            "names": list(self.names),
            "colours": [[int(v) for v in c] for c in self.colours],
            "ignore": self.ignore,
        }


def palette_for(num_classes: int, ignore: int = IGNORE) -> ClassPalette:
    """The page's palette of the model's label space (svq_fast.data.labels.space_for: the synthetic scenes' 16
    classes, the unified table, or generic names with well-spread colours)."""
    space = space_for(num_classes)
    kind = space.name if space.name in ("synthetic", "unified") else "generic"
    return ClassPalette(kind, tuple(space.names), np.asarray(space.palette, np.uint8), ignore)


def map_spec(palette: ClassPalette) -> MapSpec:
    """The palette as the shared label-file reader's spec (svq_fast.data.label_files)."""
    return MapSpec(num_classes=palette.num_classes, colours=palette.colours, space=palette.space, ignore=palette.ignore)


def check_ids(label: np.ndarray, palette: ClassPalette, what: str) -> np.ndarray:
    """-> label as uint8 if every id is a class or ignore; MapError naming the offending ids otherwise."""
    try:
        return label_files.check_ids(label, map_spec(palette), what)
    except LabelFileError as e:
        raise MapError(str(e)) from None


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def decode_grid(payload: str, size: int | tuple[int, int], palette: ClassPalette) -> np.ndarray:
    """The page's painted map: base64 of H*W raw uint8 ids, row-major -> (H, W) uint8; size: H = W, or (H, W)."""
    h, w = _shape(size)
    if not isinstance(payload, str) or not payload:
        raise MapError("no map in the request (expected base64 of the painted class ids)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MapError(f"the map is not valid base64 ({e})") from None
    if len(raw) != h * w:
        raise MapError(f"the map has {len(raw)} pixels, this model takes {h}x{w} = {h * w}; reload the page")
    return check_ids(np.frombuffer(raw, np.uint8).reshape(h, w), palette, "the painted map")


def encode_grid(label: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(label, np.uint8).tobytes()).decode("ascii")


def decode_png(data: bytes, size: int | None, palette: ClassPalette, name: str = "the upload") -> np.ndarray:
    """An uploaded label PNG -> (H, W) uint8 ids; MapError says what is wrong with it. size: the one size it must
    have (H = W = size), or None for any (the caller checks the shape, e.g. Synthesizer.check_map)."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise MapError(f"{name} is {len(data) >> 20} MiB; a label PNG is far smaller")
    try:
        img = label_files.open_png(data, name)
        if size is not None and img.size != (size, size):
            raise MapError(f"{name} is {img.size[0]}x{img.size[1]}; this model paints {size}x{size} maps")
        return label_files.ids_from_image(img, map_spec(palette), name)
    except LabelFileError as e:
        raise MapError(str(e)) from None


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W) uint8 ids (mode L) or (H, W, 3) uint8 RGB -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))
