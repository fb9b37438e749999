"""The Perception Concept Studio's shape against our native shape on the same request, side by
side in one run (JSON lines): the cost of recognising, translating and reshaping. Target: the
Studio's shape within 1.02x of native.

The shapes detector (weights/shapes-yolo11.pt) under the Studio's name `yolo26n.pt`, on a
640x480 scene; a random-weight YOLO26n-seg for segmentation (polygons to reshape).

    python bench/bench_studio.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    weights = Path(tempfile.mkdtemp(prefix="bench-studio-weights-"))
    os.environ.update(
        WEIGHTS_DIR=str(weights), ALLOW_MODEL_DOWNLOADS="false", YOLO_CONFIG_DIR=str(weights)
    )
    from scripts.make_test_weights import make_yolo_checkpoints

    shutil.copy(repo / "weights" / "shapes-yolo11.pt", weights / "yolo26n.pt")
    make_yolo_checkpoints(weights, names=("yolo26n-seg",))

    from core.apps import run_infer
    from scripts.synthetic_shapes import render_scene
    from tests.conftest import jpeg_b64

    image = jpeg_b64(render_scene(5, width=640, height=480)[0])
    cases = {
        "object-detection": ("yolo26n.pt", 0.3),
        "image-segmentation": ("yolo26n-seg.pt", 0.05),
    }
    for task, (model, threshold) in cases.items():
        studio = {
            "task": task,
            "model": model,
            "payloadBase64": image,
            "mimeType": "application/octet-stream",
            "options": {"threshold": threshold},
        }
        native = {**studio, "response_format": "native"}
        run_infer({"id": "warm", "input": studio})
        times: dict[str, list[float]] = {"studio": [], "native": []}
        for repeat in range(args.repeats):
            # Alternating, so drift on a noisy machine hits both alike.
            for shape, job in (("studio", studio), ("native", native))[:: 1 if repeat % 2 else -1]:
                started = time.perf_counter()
                output = run_infer({"id": f"{shape}-{repeat}", "input": job})
                times[shape].append(time.perf_counter() - started)
                assert not (isinstance(output, dict) and "error" in output), output
        studio_ms = statistics.median(times["studio"]) * 1000
        native_ms = statistics.median(times["native"]) * 1000
        print(
            json.dumps(
                {
                    "bench": "studio_shape_vs_native",
                    "task": task,
                    "repeats": args.repeats,
                    "studio_ms": round(studio_ms, 2),
                    "native_ms": round(native_ms, 2),
                    "ratio": round(studio_ms / native_ms, 4),
                    "target": 1.02,
                }
            )
        )


if __name__ == "__main__":
    main()
