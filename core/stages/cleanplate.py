"""cleanplate: the masked subject removed from every frame, the background filled from other
frames where they saw it, and inpainted where no frame did.

Temporal fill: each neighbour (nearest first at widening steps, up to `window` frames
either side) is warped
into the frame by a homography fitted with RANSAC on SIFT matches found on the background only
(both frames' subject masks excluded); a hole pixel takes the per-channel median of the
neighbours' warped pixels that were background there (a robust median: one neighbour's
misfit or its own subject does not win). A homography is exact for a distant or planar
background and a rotating camera; with parallax the median of near neighbours keeps the error
small. Pixels no neighbour saw are filled by OpenCV's Telea inpainting. The result reports the
share of the removed area each method filled.

ProPainter (flow-guided video inpainting) is not on PyPI and is not used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.control import cancel_requested
from core.errors import Cancelled

Progress = Callable[[float, str], None]
CANCELLED = "the job was cancelled (or ran past its execution timeout)"
MIN_INLIERS = 20
RATIO = 0.75


@dataclass
class Features:
    keypoints: np.ndarray
    """(n, 2) float32 pixel positions."""
    descriptors: np.ndarray | None


@dataclass
class CleanplateResult:
    files: list[Path]
    hole_pixels: int = 0
    temporal_pixels: int = 0
    inpainted_pixels: int = 0
    per_frame: list[dict[str, Any]] = field(default_factory=list)

    def shares(self) -> dict[str, float]:
        total = max(1, self.hole_pixels)
        return {
            "temporal_median": round(self.temporal_pixels / total, 4),
            "inpaint_telea": round(self.inpainted_pixels / total, 4),
        }


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask.astype(bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1,) * 2)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def background_features(frame: np.ndarray, hole: np.ndarray, sift: Any) -> Features:
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    allowed = np.where(hole, 0, 255).astype(np.uint8)
    keypoints, descriptors = sift.detectAndCompute(grey, allowed)
    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    return Features(points, descriptors)


def fit_homography(source: Features, target: Features, matcher: Any) -> np.ndarray | None:
    """The 3x3 homography taking `source` pixels onto `target`'s, or None (too few inliers)."""
    if source.descriptors is None or target.descriptors is None:
        return None
    if len(source.keypoints) < MIN_INLIERS or len(target.keypoints) < MIN_INLIERS:
        return None
    pairs = matcher.knnMatch(source.descriptors, target.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < MIN_INLIERS:
        return None
    src = source.keypoints[[m.queryIdx for m in good]]
    dst = target.keypoints[[m.trainIdx for m in good]]
    homography, inliers = cv2.findHomography(src, dst, cv2.RANSAC, 2.0)
    if homography is None or inliers is None or int(inliers.sum()) < MIN_INLIERS:
        return None
    return homography.astype(np.float64)


def neighbour_order(position: int, count: int, window: int) -> list[int]:
    """Other frames up to `window` away, nearest first, alternating sides, at widening steps
    (1, 2, 3, 4, 6, 9, 13, ...): far frames saw what a slow subject hides, near ones agree
    best with the frame."""
    offsets: list[int] = []
    step = 1.0
    while round(step) <= window:
        if round(step) not in offsets:
            offsets.append(round(step))
        step = step + 1 if step < 4 else step * 1.45
    order = []
    for offset in offsets:
        for other in (position - offset, position + offset):
            if 0 <= other < count:
                order.append(other)
    return order


def clean_plates(
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    out_dir: Path,
    numbers: Sequence[int],
    *,
    window: int = 30,
    max_sources: int = 8,
    dilate_px: int = 4,
    inpaint_radius: int = 5,
    max_features: int = 2000,
    progress: Progress | None = None,
) -> CleanplateResult:
    """`cleanplate_%04d.png` per frame; cancellable between frames."""
    count = len(frames)
    holes = [grow(mask, dilate_px) for mask in masks]
    sift = cv2.SIFT_create(nfeatures=max_features)  # type: ignore[attr-defined]
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    features: list[Features] = []
    for frame, hole in zip(frames, holes, strict=True):
        if cancel_requested():
            raise Cancelled(CANCELLED)
        features.append(background_features(frame, hole, sift))
    result = CleanplateResult(files=[])
    fits: dict[tuple[int, int], np.ndarray | None] = {}

    def homography(source: int, target: int) -> np.ndarray | None:
        """source -> target, fitted once per pair (the other way is its inverse)."""
        if (target, source) in fits:
            back = fits[(target, source)]
            return None if back is None else np.linalg.inv(back)
        if (source, target) not in fits:
            fits[(source, target)] = fit_homography(features[source], features[target], matcher)
        return fits[(source, target)]

    for position in range(count):
        if cancel_requested():
            raise Cancelled(CANCELLED)
        plate, stats = fill_frame(
            position, frames, holes, homography, window, max_sources, inpaint_radius
        )
        path = out_dir / f"cleanplate_{numbers[position]:04d}.png"
        if not cv2.imwrite(str(path), plate):
            raise OSError(f"could not write {path.name}")
        result.files.append(path)
        result.hole_pixels += stats["hole_pixels"]
        result.temporal_pixels += stats["temporal_pixels"]
        result.inpainted_pixels += stats["inpainted_pixels"]
        result.per_frame.append({"frame": numbers[position], **stats})
        if progress is not None:
            progress((position + 1) / count, f"frame {position + 1} of {count}")
    return result


def fill_frame(
    position: int,
    frames: Sequence[np.ndarray],
    holes: Sequence[np.ndarray],
    homography_of: Callable[[int, int], np.ndarray | None],
    window: int,
    max_sources: int,
    inpaint_radius: int,
) -> tuple[np.ndarray, dict[str, int]]:
    """One frame's clean plate and how its hole was filled."""
    frame, hole = frames[position], holes[position]
    height, width = hole.shape
    ys, xs = np.nonzero(hole)
    samples: list[np.ndarray] = []
    sources = []
    for other in neighbour_order(position, len(frames), window):
        if len(samples) >= max_sources:
            break
        homography = homography_of(other, position)
        if homography is None:
            continue
        warped = cv2.warpPerspective(
            frames[other], homography, (width, height), flags=cv2.INTER_LINEAR
        )
        seen = cv2.warpPerspective(
            np.where(holes[other], 0, 255).astype(np.uint8),
            homography,
            (width, height),
            flags=cv2.INTER_NEAREST,
            borderValue=0,
        )
        valid = seen[ys, xs] == 255
        values = np.full((len(ys), 3), np.nan, np.float32)
        values[valid] = warped[ys[valid], xs[valid]]
        samples.append(values)
        sources.append(other)
    plate = frame.copy()
    filled = np.zeros(len(ys), bool)
    if samples:
        stack = np.stack(samples)  # (sources, pixels, 3)
        seen_any = ~np.isnan(stack[..., 0])
        filled = seen_any.any(axis=0)
        if filled.any():
            median = np.nanmedian(stack[:, filled], axis=0)
            plate[ys[filled], xs[filled]] = np.clip(np.round(median), 0, 255).astype(np.uint8)
    unseen = np.zeros((height, width), np.uint8)
    unseen[ys[~filled], xs[~filled]] = 255
    if unseen.any():
        plate = cv2.inpaint(plate, unseen, inpaint_radius, cv2.INPAINT_TELEA)
    return plate, {
        "hole_pixels": len(ys),
        "temporal_pixels": int(filled.sum()),
        "inpainted_pixels": int((~filled).sum()),
        "sources": len(sources),
    }
