"""Encoders for results: masks (COCO RLE, polygons, PNG) and images (JPEG)."""

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
