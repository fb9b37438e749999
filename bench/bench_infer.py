"""Infer worker benchmarks: JSON lines on stdout, ratios measured side by side in one run.

    python bench/bench_infer.py [--repeats 15]

Uses WEIGHTS_DIR's yolo11n*.pt when present, else random-weight checkpoints of the same
architectures (speed does not depend on the weights' values). Real footage from
../shared/media gives the 1080p frame when present, else a synthetic one.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-"))


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def frame_1080p() -> tuple[np.ndarray, str]:
    video = REPO.parent / "shared" / "media" / "street_pedestrians_cyclist_1080p.mp4"
    if video.exists():
        from core.media import iter_video_frames

        frame = next(iter(iter_video_frames(video, start_sec=1.0, max_frames=1)))
        return frame.pixels, video.name
    rng = np.random.default_rng(0)
    pixels = cv2.GaussianBlur(rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8), (9, 9), 3)
    return pixels, "synthetic"


def jpeg_b64(pixels: np.ndarray, quality: int = 90) -> str:
    return base64.b64encode(
        cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
    ).decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    repeats = args.repeats

    weights = Path(os.environ.get("WEIGHTS_DIR", REPO / "weights"))
    if not (weights / "yolo11n.pt").exists():
        from scripts.make_test_weights import make_yolo_checkpoints

        weights = Path(tempfile.mkdtemp(prefix="bench-weights-"))
        make_yolo_checkpoints(weights)
    os.environ["WEIGHTS_DIR"] = str(weights)
    os.environ.setdefault("ALLOW_MODEL_DOWNLOADS", "false")

    from core.apps import run_infer as run_infer_job
    from core.media import decode_image
    from core.tasks._yolo import load_yolo

    big, source = frame_1080p()
    vga = cv2.resize(big, (640, 480), interpolation=cv2.INTER_AREA)
    vga_b64 = jpeg_b64(vga)
    vga_pixels = decode_image(base64.b64decode(vga_b64), max_pixels=10**8).pixels
    common = {
        "device": "cpu",
        "torch_threads": __import__("torch").get_num_threads(),
        "frames_from": source,
    }

    # 1. Handler end to end vs bare YOLO.predict on the same decoded array, interleaved.
    model = load_yolo("yolo11n.pt", "detect").model
    job = {"id": "bench", "input": {"task": "object-detection", "image": vga_b64}}

    def bare() -> Any:
        return model.predict(vga_pixels, device="cpu", verbose=False)

    def handler() -> dict[str, Any]:
        return json.dumps(run_infer_job(job))

    bare_ms, handler_ms = [], []
    bare(), handler()
    for _ in range(repeats):
        bare_ms.append(median_ms(bare, 1))
        handler_ms.append(median_ms(handler, 1))
    b, h = statistics.median(bare_ms), statistics.median(handler_ms)
    emit(
        bench="handler_vs_bare_predict",
        image="640x480 jpeg base64",
        handler_ms=round(h, 2),
        bare_predict_ms=round(b, 2),
        ratio=round(h / b, 3),
        target_ratio=1.10,
        **common,
    )

    # 2. Decode of a base64 1080p JPEG (base64 -> bytes -> header check -> pixels).
    big_b64 = jpeg_b64(big)

    def decode_1080p() -> Any:
        return decode_image(base64.b64decode(big_b64), max_pixels=10**8)

    emit(
        bench="decode_1080p_jpeg_base64",
        ms=round(median_ms(decode_1080p, repeats * 2), 2),
        jpeg_bytes=len(base64.b64decode(big_b64)),
        target_ms=15,
        **common,
    )

    # 3. A batch of 8 images in one request vs 8 single requests.
    images = [
        jpeg_b64(cv2.resize(big[y : y + 540, x : x + 960], (640, 480)))
        for y in (0, 540)
        for x in (0, 480, 960, 0)
    ][:8]
    batch_job = {"id": "bench", "input": {"task": "object-detection", "images": images}}
    single_jobs = [
        {"id": "bench", "input": {"task": "object-detection", "image": i}} for i in images
    ]

    def batch() -> Any:
        return run_infer_job(batch_job)

    def singles() -> Any:
        return [run_infer_job(j) for j in single_jobs]

    batch_ms, singles_ms = [], []
    for _ in range(max(3, repeats // 3)):
        batch_ms.append(median_ms(batch, 1))
        singles_ms.append(median_ms(singles, 1))
    bm, sm = statistics.median(batch_ms), statistics.median(singles_ms)
    emit(
        bench="batch8_vs_8_singles",
        batch_ms=round(bm, 1),
        singles_ms=round(sm, 1),
        throughput_ratio=round(sm / bm, 3),
        target_ratio=1.3,
        **common,
    )

    # 4. Response bytes for segmentation of a 1080p image, per mask format.
    sizes = {}
    for fmt in ("rle", "polygon", "png"):
        result = run_infer_job(
            {
                "id": "bench",
                "input": {
                    "task": "image-segmentation",
                    "image": big_b64,
                    "options": {"mask_format": fmt, "threshold": 0.0, "max_det": 20},
                },
            }
        )
        masks = sum(1 for d in result["results"][0]["detections"] if "mask" in d)
        sizes[fmt] = {"response_bytes": len(json.dumps(result)), "masks": masks}
    emit(
        bench="segmentation_1080p_response_bytes",
        **sizes,
        note="random-weight yolo11n-seg with box-filling masks unless WEIGHTS_DIR has real ones",
        **common,
    )


if __name__ == "__main__":
    main()
