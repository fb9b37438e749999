"""Synthetic clips with known motion: shapes from `synthetic_shapes` sliding over a static
textured background at constant pixel velocities, with every frame's true boxes.

Backs the video tests (tracking keeps one id per shape; velocity from optical flow matches
the known speed) and the video benchmarks. Only numpy and OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from scripts.synthetic_shapes import _background, render_scene


@dataclass(frozen=True)
class MovingShape:
    class_name: str
    velocity: tuple[float, float]
    """Pixels per frame (x, y)."""
    boxes: list[tuple[float, float, float, float]]
    """True xyxy box in every frame."""


@dataclass(frozen=True)
class SyntheticClip:
    frames: list[np.ndarray]  # BGR uint8
    fps: float
    shapes: list[MovingShape]


def moving_shapes_clip(
    seed: int = 0,
    *,
    width: int = 320,
    height: int = 240,
    frame_count: int = 24,
    fps: float = 12.0,
    velocities: list[tuple[float, float]] | None = None,
    shapes: int = 1,
    texture: float = 0.0,
) -> SyntheticClip:
    """`shapes` shapes from `render_scene(seed)`, each moving at its velocity (px/frame).

    `texture` > 0 adds a fixed pattern of that amplitude inside each shape (moving with it),
    which optical flow needs to see motion inside a shape and not only at its edges."""
    velocities = velocities or [(3.0, 0.0)] * shapes
    if len(velocities) != shapes:
        raise ValueError("one velocity per shape")
    scene, drawn = render_scene(seed, width, height, min_shapes=shapes, max_shapes=shapes)
    background, _ = _background(np.random.default_rng(seed + 10_000), width, height)
    rng = np.random.default_rng(seed + 20_000)
    pattern = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 2.0)
    pattern *= texture / max(float(np.abs(pattern).max()), 1e-6)
    sprites = []
    for shape in drawn:
        colour = scene[shape.mask].mean(axis=0)
        sprite = np.clip(colour[None, None, :] + pattern[..., None], 0, 255).astype(np.uint8)
        sprites.append((shape.mask.astype(np.uint8), sprite))
    frames = []
    boxes: list[list[tuple[float, float, float, float]]] = [[] for _ in drawn]
    for t in range(frame_count):
        frame = background.copy()
        for i, ((mask, sprite), (vx, vy)) in enumerate(zip(sprites, velocities, strict=True)):
            shift = np.float32([[1, 0, vx * t], [0, 1, vy * t]])
            moved_mask = cv2.warpAffine(mask, shift, (width, height), flags=cv2.INTER_NEAREST)
            moved = cv2.warpAffine(sprite, shift, (width, height), flags=cv2.INTER_LINEAR)
            inside = moved_mask > 0
            frame[inside] = moved[inside]
            ys, xs = np.nonzero(inside)
            box = (
                (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                if xs.size
                else (0.0, 0.0, 0.0, 0.0)
            )
            boxes[i].append(box)
        frames.append(frame)
    moving = [
        MovingShape(shape.class_name, velocities[i], boxes[i]) for i, shape in enumerate(drawn)
    ]
    return SyntheticClip(frames, fps, moving)
