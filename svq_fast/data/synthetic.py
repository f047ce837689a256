"""Synthetic semantic scenes: the built-in default data and a benchmark for the paper's claims.

A scene is a horizon layout (one of the sky classes above a slightly tilted horizon, one of the ground
classes below) plus 2-7 objects of several shapes and sizes, some small or thin. Every class renders with
its own texture family (a colour distribution and a pattern: stripes, checks, blobs, dots, gradients,
noise), and each image draws fresh texture parameters (hue jitter, pattern phase, frequency, angle), so
the image is a stochastic function of the semantic map: the map fixes *what* is where, the texture
parameters are the image-only information the image latent must carry.

Everything is deterministic by (seed, index). No file I/O here; `make_shards --dataset synthetic` writes
the shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255

# name, role, shape (objects only), base RGB, colour spread, pattern
# role: sky | ground | object. Shape: disk | box | triangle | pole | bar | ellipse | ring | cross
_CLASS_TABLE = [
    ("sky-clear", "sky", None, (110, 160, 230), 18, "gradient"),
    ("sky-cloudy", "sky", None, (175, 185, 200), 14, "blobs"),
    ("grass", "ground", None, (70, 140, 50), 20, "noise"),
    ("road", "ground", None, (95, 95, 100), 10, "stripes"),
    ("sand", "ground", None, (205, 180, 120), 15, "dots"),
    ("water", "ground", None, (40, 90, 160), 15, "waves"),
    ("tree", "object", "ellipse", (30, 100, 35), 20, "blobs"),
    ("house", "object", "box", (170, 70, 55), 25, "checks"),
    ("car", "object", "box", (200, 30, 30), 40, "flat"),
    ("person", "object", "ellipse", (230, 180, 140), 25, "flat"),
    ("pole", "object", "pole", (60, 60, 60), 10, "flat"),
    ("fence", "object", "bar", (140, 110, 70), 15, "stripes"),
    ("sign", "object", "triangle", (240, 210, 30), 20, "flat"),
    ("rock", "object", "disk", (120, 115, 105), 15, "noise"),
    ("flower", "object", "ring", (220, 60, 170), 35, "dots"),
    ("lamp", "object", "cross", (250, 240, 190), 10, "gradient"),
]

CLASS_NAMES = tuple(c[0] for c in _CLASS_TABLE)
NUM_CLASSES = len(_CLASS_TABLE)
_SKY = [i for i, c in enumerate(_CLASS_TABLE) if c[1] == "sky"]
_GROUND = [i for i, c in enumerate(_CLASS_TABLE) if c[1] == "ground"]
_OBJECTS = [i for i, c in enumerate(_CLASS_TABLE) if c[1] == "object"]


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


def _texture(cls: int, size: int, rng: np.random.Generator, yy, xx) -> np.ndarray:
    """(S, S, 3) float texture of class `cls` with per-image random parameters."""
    _, _, _, base, spread, pattern = _CLASS_TABLE[cls]
    colour = np.clip(np.asarray(base, np.float32) + rng.normal(0, spread, 3), 0, 255)
    alt = np.clip(colour * rng.uniform(0.55, 0.8) + rng.normal(0, spread / 2, 3), 0, 255)
    freq = (
        rng.uniform(0.15, 0.45) * 64.0 / size
    )  # cycles per pixel, scaled so patterns look alike at any size
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
    elif pattern == "noise":
        coarse = rng.uniform(0, 1, (max(2, size // 8), max(2, size // 8)))
        t = np.kron(coarse, np.ones((size // coarse.shape[0] + 1,) * 2))[:size, :size]
    else:  # pragma: no cover - table is fixed
        raise ValueError(pattern)
    return colour[None, None, :] * (1 - t[..., None]) + alt[None, None, :] * t[..., None]


def render_scene(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene number `index`: (image (S, S, 3) uint8, label (S, S) uint8 class ids)."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # horizon: y = h0 + slope * (x - S/2)
    h0 = rng.uniform(0.25, 0.65) * size
    slope = rng.uniform(-0.15, 0.15)
    sky, ground = int(rng.choice(_SKY)), int(rng.choice(_GROUND))
    label = np.where(yy < h0 + slope * (xx - size / 2), sky, ground).astype(np.uint8)

    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    for _ in range(n_obj):
        cls = int(rng.choice(_OBJECTS))
        # sizes span small (a few pixels at 64) to large; log-uniform so small objects are common
        r = float(np.exp(rng.uniform(np.log(0.04 * size), np.log(0.22 * size))))
        cy = rng.uniform(0.2, 0.95) * size
        cx = rng.uniform(0.05, 0.95) * size
        mask = _shape_mask(_CLASS_TABLE[cls][2], yy, xx, cy, cx, r, rng.uniform(-0.5, 0.5), rng)
        label[mask] = cls

    image = np.zeros((size, size, 3), np.float32)
    for cls in np.unique(label):
        m = label == cls
        image[m] = _texture(int(cls), size, rng, yy, xx)[m]
    # soft shading across the image and sensor noise: image-only nuisance variables
    light = rng.uniform(0.8, 1.15) + rng.uniform(-0.15, 0.15) * (xx / size - 0.5)
    image = image * light[..., None] + rng.normal(0, spec.noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def class_names() -> tuple[str, ...]:
    return CLASS_NAMES
