"""Synthetic semantic scenes: the built-in default data and a benchmark for the paper's claims.

A scene is a horizon layout (one of the sky classes above a slightly tilted horizon, one of the ground
classes below) plus 2-7 objects of several shapes and sizes, some small or thin. Every class renders with
its own texture family (a pattern: stripes, checks, blobs, dots, gradients, noise, flat) and a few colour
materials shared with other classes, and every instance draws fresh texture parameters (material, colour
jitter, pattern phase, frequency, angle), so the image is a stochastic function of the semantic map: the map
fixes *what* is where, the texture parameters are the image-only information the image latent must carry.
Because materials are shared (white car / white house / cloudy sky, grey road / pole / rock), a per-pixel
colour classifier does badly (tests/data/test_data_synthetic.py measures it; benchmarks/results/data_cpu.md
has the numbers): the semantic map has to be read from texture, shape and layout.

Everything is deterministic by (seed, index). No file I/O here; `make_shards --dataset synthetic` writes
the shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bump whenever rendering changes: cached shards are keyed by it (svq_fast.data.run_shards.ensure_synthetic).
SYNTHETIC_VERSION = 2

# Shared colour materials. Classes draw each instance's colour from a few of these, and most materials are used
# by several classes (a white car, a white house, a cloudy sky; grey road, grey pole, grey rock), so colour
# alone does not tell the class: texture, shape and context (above/below the horizon) must.
_MATERIALS = {
    "white": (222, 222, 216),
    "pale": (196, 208, 226),
    "lightgrey": (168, 170, 176),
    "grey": (112, 112, 116),
    "dark": (50, 50, 56),
    "red": (186, 48, 40),
    "orange": (200, 120, 50),
    "brown": (120, 82, 52),
    "beige": (200, 178, 138),
    "yellow": (222, 196, 52),
    "green": (74, 136, 56),
    "darkgreen": (38, 84, 40),
    "olive": (140, 150, 70),
    "blue": (52, 92, 168),
    "lightblue": (120, 164, 224),
    "pink": (212, 96, 160),
}

# name, role, shape (objects only), colour materials, colour spread, pattern, visualisation colour
# role: sky | ground | object. Shape: disk | box | triangle | pole | bar | ellipse | ring | cross
_CLASS_TABLE = [
    ("sky-clear", "sky", None, ("lightblue", "pale", "blue"), 14, "gradient", (70, 130, 180)),
    ("sky-cloudy", "sky", None, ("lightgrey", "white", "pale", "grey"), 12, "blobs", (180, 180, 200)),
    ("grass", "ground", None, ("green", "olive", "darkgreen"), 16, "noise", (0, 200, 0)),
    ("road", "ground", None, ("grey", "dark", "lightgrey"), 10, "stripes", (128, 64, 128)),
    ("sand", "ground", None, ("beige", "yellow", "white", "orange"), 14, "dots", (230, 210, 140)),
    ("water", "ground", None, ("blue", "lightblue", "darkgreen", "grey"), 14, "waves", (0, 80, 255)),
    ("tree", "object", "ellipse", ("darkgreen", "green", "olive", "orange"), 16, "blobs", (0, 110, 0)),
    ("house", "object", "box", ("red", "white", "beige", "lightgrey", "brown"), 16, "checks", (160, 40, 40)),
    ("car", "object", "box", ("red", "white", "dark", "lightgrey", "blue", "yellow"), 16, "flat", (0, 0, 142)),
    ("person", "object", "ellipse", ("beige", "red", "blue", "dark", "pink", "green"), 16, "flat", (220, 20, 60)),
    ("pole", "object", "pole", ("grey", "dark", "lightgrey", "brown"), 10, "flat", (153, 153, 153)),
    ("fence", "object", "bar", ("brown", "white", "grey", "dark"), 12, "stripes", (190, 153, 153)),
    ("sign", "object", "triangle", ("yellow", "red", "blue", "white"), 14, "flat", (220, 220, 0)),
    ("rock", "object", "disk", ("grey", "lightgrey", "brown", "beige"), 14, "noise", (120, 100, 80)),
    ("flower", "object", "ring", ("pink", "yellow", "red", "white", "orange"), 18, "dots", (255, 0, 255)),
    ("lamp", "object", "cross", ("white", "yellow", "pale", "lightgrey"), 10, "gradient", (250, 170, 30)),
]

CLASS_NAMES = tuple(c[0] for c in _CLASS_TABLE)
NUM_CLASSES = len(_CLASS_TABLE)
_SKY = [i for i, c in enumerate(_CLASS_TABLE) if c[1] == "sky"]
_GROUND = [i for i, c in enumerate(_CLASS_TABLE) if c[1] == "ground"]
_OBJECTS = [i for i, c in enumerate(_CLASS_TABLE) if c[1] == "object"]


def class_colours() -> np.ndarray:
    """(NUM_CLASSES, 3) uint8 distinct colours for visualising synthetic label maps (not the render colours)."""
    return np.array([c[6] for c in _CLASS_TABLE], np.uint8)


@dataclass(frozen=True)
class SyntheticSpec:
    size: int = 64
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 7
    noise: float = 4.0  # std of per-pixel sensor noise, in 0..255 units


def _shape_mask(shape: str, yy, xx, cy, cx, r, angle, rng) -> np.ndarray:
    """Boolean (S, S) mask of one object centred at (cy, cx) with size r (pixels)."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if shape == "disk":
        return dx * dx + dy * dy <= r * r
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (0.55 * r)) ** 2 <= 1.0
    if shape == "box":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.6 * r)
    if shape == "triangle":
        # upward triangle: inside when below the two slanted edges and above the base
        return (dy <= 0.6 * r) & (dy >= -r + 1.7 * np.abs(dx))
    if shape == "pole":  # thin vertical line, 1-2 px wide at 64x64
        w = max(0.6, 0.06 * r)
        return (np.abs(dx) <= w) & (np.abs(dy) <= 1.6 * r)
    if shape == "bar":  # thin horizontal band
        w = max(0.6, 0.08 * r)
        return (np.abs(v) <= w) & (np.abs(u) <= 1.8 * r)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        w = max(0.6, 0.15 * r)
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(cls: int, size: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(N, 3) float colours at pixels (yy, xx) (each (N,)) of one instance of class `cls`: a colour material
    drawn from the class's list, jittered, and the class's pattern with random frequency, angle and phase."""
    _, _, _, materials, spread, pattern, _ = _CLASS_TABLE[cls]
    base = _MATERIALS[materials[int(rng.integers(len(materials)))]]
    colour = np.clip(np.asarray(base, np.float32) + rng.normal(0, spread, 3), 0, 255)
    alt = np.clip(colour * rng.uniform(0.55, 0.8) + rng.normal(0, spread / 2, 3), 0, 255)
    freq = rng.uniform(0.15, 0.45) * 64.0 / size  # cycles per pixel, scaled so patterns look alike at any size
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    proj = np.cos(angle) * xx + np.sin(angle) * yy
    if pattern == "flat":
        t = np.zeros_like(proj)
    elif pattern == "gradient":
        t = (yy / size) * rng.uniform(0.5, 1.0)
    elif pattern == "stripes":
        t = (np.sin(2 * np.pi * freq * proj + phase) > 0).astype(np.float32)
    elif pattern == "waves":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * proj + phase + 2.0 * np.sin(0.3 * freq * xx))
    elif pattern == "checks":
        a = np.floor(xx * freq * 2 + phase) + np.floor(yy * freq * 2)
        t = (a % 2).astype(np.float32)
    elif pattern == "dots":
        cell = max(2.0, 1.0 / freq / 1.5)
        fy, fx = (yy + phase) % cell - cell / 2, (xx + 2 * phase) % cell - cell / 2
        t = (fy * fy + fx * fx <= (cell * 0.3) ** 2).astype(np.float32)
    elif pattern == "blobs":
        t = 0.5 + 0.25 * (np.sin(freq * 2.1 * xx + phase) + np.sin(freq * 1.7 * yy + 2 * phase))
    elif pattern == "noise":  # blocky value noise: one random value per (size // n + 1)-pixel cell
        n = max(2, size // 8)
        coarse = rng.uniform(0, 1, (n, n))
        cell = size // n + 1
        t = coarse[(yy // cell).astype(np.intp), (xx // cell).astype(np.intp)]
    else:  # pragma: no cover - table is fixed
        raise ValueError(pattern)
    return colour[None, :] * (1 - t[:, None]) + alt[None, :] * t[:, None]


# Third entry of a re-render's seed sequence: keeps the texture streams apart from every scene's own [seed, index].
_TEXTURE_STREAM = 0x7E57


def render_scene(spec: SyntheticSpec, index: int, texture_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scene number `index`: (image (S, S, 3) uint8, label (S, S) uint8 class ids).

    texture_seed None: the scene as written to the shards. An int: the same layout (the label map is identical)
    re-rendered with fresh image-only draws (every instance's material, colour jitter and pattern, the shading and
    the sensor noise) from their own stream [seed, index, _TEXTURE_STREAM, texture_seed]: the real spread of the
    images one map stands for, the reference of the diversity rows (svq_fast/eval/diversity.py)."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # horizon: y = h0 + slope * (x - S/2); instance 0 = sky region, 1 = ground region, 2.. = objects
    h0 = rng.uniform(0.25, 0.65) * size
    slope = rng.uniform(-0.15, 0.15)
    sky, ground = int(rng.choice(_SKY)), int(rng.choice(_GROUND))
    above = yy < h0 + slope * (xx - size / 2)
    label = np.where(above, sky, ground).astype(np.uint8)
    instance = np.where(above, 0, 1).astype(np.int32)
    classes = [sky, ground]

    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    for _ in range(n_obj):
        cls = int(rng.choice(_OBJECTS))
        # sizes span small (a few pixels at 64) to large; log-uniform so small objects are common
        r = float(np.exp(rng.uniform(np.log(0.04 * size), np.log(0.22 * size))))
        cy = rng.uniform(0.2, 0.95) * size
        cx = rng.uniform(0.05, 0.95) * size
        mask = _shape_mask(_CLASS_TABLE[cls][2], yy, xx, cy, cx, r, rng.uniform(-0.5, 0.5), rng)
        label[mask] = cls
        instance[mask] = len(classes)
        classes.append(cls)

    if texture_seed is not None:  # the layout draws above are done: the image-only draws below come from a new stream
        if texture_seed < 0:
            raise ValueError(f"texture_seed must be None or >= 0, got {texture_seed}")
        rng = np.random.default_rng([spec.seed, index, _TEXTURE_STREAM, texture_seed])
    # every instance gets its own material and texture parameters (two cars in one image differ)
    image = np.zeros((size, size, 3), np.float32)
    for inst, cls in enumerate(classes):
        m = instance == inst
        if m.any():
            image[m] = _texture(cls, size, rng, yy[m], xx[m])
    # soft shading across the image and sensor noise: image-only nuisance variables
    light = rng.uniform(0.8, 1.15) + rng.uniform(-0.15, 0.15) * (xx / size - 0.5)
    image = image * light[..., None] + rng.normal(0, spec.noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def class_names() -> tuple[str, ...]:
    return CLASS_NAMES
