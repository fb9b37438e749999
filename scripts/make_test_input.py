"""Writes test_input.json: object detection on a synthetic shapes scene with the tiny shapes
detector committed in weights/, so `make run` works offline on a fresh machine.

    python scripts/make_test_input.py
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.synthetic_shapes import render_scene  # noqa: E402

SEED = 2024


def main() -> None:
    image, shapes = render_scene(SEED, width=320, height=240)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    job = {
        "input": {
            "task": "object-detection",
            "model": "shapes-yolo11.pt",
            "image": base64.b64encode(jpeg).decode(),
            "options": {"threshold": 0.5},
        }
    }
    (REPO / "test_input.json").write_text(json.dumps(job, indent=1) + "\n")
    for shape in shapes:
        print(shape.class_name, [round(v) for v in shape.box])


if __name__ == "__main__":
    main()
