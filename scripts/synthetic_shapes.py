"""Deterministic synthetic scenes of solid shapes with exact ground truth.

``render_scene(seed)`` draws 1-4 non-overlapping circles, squares and triangles on a
textured background and returns the BGR image together with, for every shape, its
class, its tight pixel bounding box and its exact pixel mask. Only numpy and OpenCV
are used, so it runs anywhere the worker runs; it backs the tiny test detector
(``scripts/train_shapes_detector.py``) and end-to-end accuracy tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")

_MIN_COLOUR_CONTRAST = 110.0  # min Euclidean BGR distance between a shape and the background
_MIN_SHAPE_SEPARATION = 70.0  # min Euclidean BGR distance between two shapes of one scene
_REQUIRED_ATTEMPTS = 2000
_OPTIONAL_ATTEMPTS = 200


@dataclass(frozen=True)
class Shape:
    """One drawn shape: class, tight pixel box ``(x1, y1, x2, y2)`` and exact mask."""

    class_id: int
    class_name: str
    box: tuple[float, float, float, float]  # pixel xyxy, tight around the drawn shape
    mask: np.ndarray = field(compare=False, repr=False)  # bool HxW, exactly the drawn pixels


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Varied base colour + linear gradient + low-frequency blotches + mild pixel noise."""
    base = rng.uniform(20.0, 235.0, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(angle) * xx / max(width, 1) + np.sin(angle) * yy / max(height, 1)).astype(
        np.float32
    )
    ramp -= ramp.mean()
    gradient = ramp[..., None] * rng.uniform(-50.0, 50.0, size=3).astype(np.float32)
    cells = (int(rng.integers(3, 9)), int(rng.integers(3, 9)))
    blotches = rng.normal(0.0, rng.uniform(4.0, 14.0), size=(cells[1], cells[0], 3)).astype(
        np.float32
    )
    blotches = cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0.0, rng.uniform(2.0, 7.0), size=(height, width, 3)).astype(np.float32)
    image = base.astype(np.float32) + gradient + blotches + noise
    return np.clip(image, 0, 255).astype(np.uint8), base


def _pick_colour(
    rng: np.random.Generator, background: np.ndarray, used: list[np.ndarray]
) -> np.ndarray:
    """A saturated-ish colour far from the background mean and from colours already used."""
    best, best_score = None, -1.0
    for _ in range(200):
        hsv = np.array(
            [[[rng.integers(0, 180), rng.integers(90, 256), rng.integers(70, 256)]]], dtype=np.uint8
        )
        if rng.random() < 0.15:  # occasional near-grey shapes (black / white / grey)
            hsv[0, 0, 1] = rng.integers(0, 40)
            hsv[0, 0, 2] = rng.choice([rng.integers(0, 50), rng.integers(200, 256)])
        colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)
        contrast = float(np.linalg.norm(colour - background))
        separation = min((float(np.linalg.norm(colour - u)) for u in used), default=1e9)
        score = min(contrast / _MIN_COLOUR_CONTRAST, separation / _MIN_SHAPE_SEPARATION)
        if score >= 1.0:
            return colour
        if score > best_score:
            best, best_score = colour, score
    assert best is not None
    return best


def _shape_mask(
    rng: np.random.Generator, class_id: int, size: float, width: int, height: int, margin: int
) -> np.ndarray | None:
    """Rasterise one shape of roughly ``size`` px at a random position; None if it does not fit."""
    half = size / 2.0
    cx = (
        rng.uniform(half + margin, width - half - margin)
        if width - 2 * (half + margin) > 0
        else None
    )
    cy = (
        rng.uniform(half + margin, height - half - margin)
        if height - 2 * (half + margin) > 0
        else None
    )
    if cx is None or cy is None:
        return None
    canvas = np.zeros((height, width), dtype=np.uint8)
    name = CLASS_NAMES[class_id]
    if name == "circle":
        cv2.circle(
            canvas,
            (round(cx), round(cy)),
            max(round(half), 1),
            255,
            thickness=-1,
            lineType=cv2.LINE_8,
        )
    else:
        if name == "square":
            angles = (
                np.deg2rad(rng.uniform(-25.0, 25.0)) + np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
            )
            radius = half / np.cos(np.pi / 4) * 0.85  # keep rotated squares within ~size
        else:  # triangle, roughly upright (random tilt), vertices on the circumcircle
            angles = (
                np.deg2rad(rng.uniform(-30.0, 30.0) - 90.0) + np.array([0.0, 2.0, 4.0]) * np.pi / 3
            )
            angles = angles + rng.uniform(-0.12, 0.12, size=3)
            radius = half * 1.1
        pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255, lineType=cv2.LINE_8)
    mask = canvas > 0
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    if xs.min() < 1 or ys.min() < 1 or xs.max() > width - 2 or ys.max() > height - 2:
        return None  # must lie fully inside the image (with a 1 px border)
    return mask


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _overlaps(box: tuple[float, float, float, float], others: list[Shape], gap: float) -> bool:
    x1, y1, x2, y2 = box
    for other in others:
        ox1, oy1, ox2, oy2 = other.box
        if x1 < ox2 + gap and ox1 < x2 + gap and y1 < oy2 + gap and oy1 < y2 + gap:
            return True
    return False


def render_scene(
    seed: int,
    width: int = 320,
    height: int = 240,
    min_shapes: int = 1,
    max_shapes: int = 4,
    *,
    size_range: tuple[float, float] = (0.12, 0.40),
) -> tuple[np.ndarray, list[Shape]]:
    """Render a deterministic scene for ``seed``.

    Returns a BGR ``uint8`` image of shape ``(height, width, 3)`` and the drawn shapes.
    Shapes are solid, mutually non-overlapping (boxes separated by a margin), fully
    inside the image and roughly 12%-40% of the short image side in size. Each
    ``Shape.box`` is the tight box of its mask: ``(min_x, min_y, max_x + 1, max_y + 1)``.
    ``size_range`` (fractions of the short side) is only widened for training data.
    """
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError("need 1 <= min_shapes <= max_shapes")
    if width < 32 or height < 32:
        raise ValueError("scene must be at least 32x32 pixels")
    low, high = size_range
    if not 0.0 < low <= high < 1.0:
        raise ValueError("size_range must satisfy 0 < low <= high < 1")
    rng = np.random.default_rng(seed)
    image, background = _background(rng, width, height)
    short = min(width, height)
    gap = max(4.0, 0.03 * short)
    border = max(1, round(0.01 * short))
    count = int(rng.integers(min_shapes, max_shapes + 1))
    shapes: list[Shape] = []
    colours: list[np.ndarray] = []
    for index in range(count):
        required = index < min_shapes
        attempts = _REQUIRED_ATTEMPTS if required else _OPTIONAL_ATTEMPTS
        for attempt in range(attempts):
            class_id = int(rng.integers(0, len(CLASS_NAMES)))
            # shrink towards the small end when the scene is crowded
            top = high if attempt < attempts // 2 else low + 0.25 * (high - low)
            size = rng.uniform(low, top) * short
            mask = _shape_mask(rng, class_id, size, width, height, border)
            if mask is None:
                continue
            box = _mask_box(mask)
            if _overlaps(box, shapes, gap):
                continue
            colour = _pick_colour(rng, background, colours)
            colours.append(colour)
            image[mask] = colour.astype(np.uint8)
            shapes.append(Shape(class_id, CLASS_NAMES[class_id], box, mask))
            break
        else:
            if required:
                raise RuntimeError(
                    f"could not place {min_shapes} shapes in a {width}x{height} scene"
                )
            break
    return image, shapes
