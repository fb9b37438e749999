"""Encoders for results: masks (COCO RLE, polygons, PNG), depth maps (16-bit PNG), images (JPEG)."""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

MASK_FORMATS = ("polygon", "rle", "png")


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a binary HxW mask: `{"size": [h, w], "counts": str}`."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    counts = rle["counts"]
    coco = {
        "size": list(rle["size"]),
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }
    return mask_utils.decode(coco).astype(bool)


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[list[float]]:
    """Outer contours as COCO polygons: one flat [x1, y1, x2, y2, ...] list per region."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = []
    for contour in contours:
        if len(contour) < min_points:
            continue
        polygons.append([round(float(v), 1) for v in contour.reshape(-1)])
    return polygons


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons back to a mask (for clients and tests)."""
    canvas = np.zeros((height, width), np.uint8)
    for polygon in polygons:
        points = np.round(np.asarray(polygon, np.float64).reshape(-1, 2)).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1)
        cv2.polylines(canvas, [points], True, 1)
    return canvas.astype(bool)


def mask_to_png(mask: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_BILEVEL, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def encode_mask(mask: np.ndarray, fmt: str) -> dict[str, Any]:
    if fmt == "rle":
        return {"format": "rle", **mask_to_rle(mask)}
    if fmt == "png":
        data = base64.b64encode(mask_to_png(mask)).decode("ascii")
        return {"format": "png", "data": data}
    return {"format": "polygon", "polygons": mask_to_polygons(mask)}


def image_to_jpeg(pixels_bgr: np.ndarray, quality: int = 85) -> bytes:
    ok, buffer = cv2.imencode(".jpg", pixels_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buffer.tobytes()


# --------------------------------------------------------------------------------------------
# Depth maps: 16-bit PNG with a linear mapping back to the model's values

DEPTH_PNG_LEVELS = 65535


def depth_to_uint16(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Quantise to 0..65535 linearly over [lo, hi]: `q = round((v - lo) / (hi - lo) * 65535)`.

    Values outside [lo, hi] are clipped; a flat range (hi == lo) gives all zeros. Non-finite
    values become 0."""
    span = float(hi) - float(lo)
    if not span > 0:
        return np.zeros(depth.shape, np.uint16)
    scaled = (depth.astype(np.float64) - float(lo)) * (DEPTH_PNG_LEVELS / span)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=DEPTH_PNG_LEVELS, neginf=0.0)
    return np.clip(np.rint(scaled), 0, DEPTH_PNG_LEVELS).astype(np.uint16)


def uint16_to_depth(levels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The inverse mapping: `v = lo + q / 65535 * (hi - lo)` (float32)."""
    span = float(hi) - float(lo)
    values = float(lo) + levels.astype(np.float64) * (span / DEPTH_PNG_LEVELS)
    return values.astype(np.float32)


def depth_to_png16(depth: np.ndarray, lo: float, hi: float, compression: int = 1) -> bytes:
    """A single-channel 16-bit PNG of an HxW map, quantised over [lo, hi] (`depth_to_uint16`).

    Any PNG reader that keeps 16 bits decodes it (OpenCV `IMREAD_UNCHANGED`, Pillow `I;16`)."""
    if depth.ndim != 2:
        raise ValueError(f"a depth map is HxW, got shape {depth.shape}")
    levels = depth_to_uint16(depth, lo, hi)
    ok, buffer = cv2.imencode(".png", levels, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def png16_to_depth(data: bytes, lo: float, hi: float) -> np.ndarray:
    """Decode a `depth_to_png16` PNG back to values (float32, HxW)."""
    levels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if levels is None or levels.dtype != np.uint16 or levels.ndim != 2:
        raise ValueError("not a single-channel 16-bit PNG")
    return uint16_to_depth(levels, lo, hi)
