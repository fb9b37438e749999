"""SAM 3 (sam3-concept-segmentation) on CPU: JSON lines on stdout, one process, one after another.

    python bench/bench_sam3.py [--imgsz 1008,504] [--repeats 2] [--frames 4]

Through the worker's own job runner (warm model; whole job: decode, model, masks, JSON):
  * model load (build + read of sam3.pt),
  * latency per 640x480 image with the concepts "person, bicycle", per model input size
    (1008 is SAM 3's native size; the concepts' text embedding is cached after the first job),
  * frames per second on a clip (640x360 frames), per input size.

Weights: WEIGHTS_DIR's sam3.pt when present, else a random-weight one of the same architecture
made by scripts/make_test_weights_sam3.py (speed does not depend on the weights' values, except
on video, where the number of objects followed does: `--max-objects`, default 4, bounds it; an
untrained detector scores every query near 0.5, so the cap is always reached). Frames: the 1080p
street clip of ../shared/media when present, else a synthetic one.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-"))

STREET = REPO.parent / "shared" / "media" / "street_pedestrians_cyclist_1080p.mp4"
CONCEPTS = "person, bicycle"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def prepare_weights() -> tuple[Path, str]:
    weights = Path(os.environ.get("WEIGHTS_DIR", REPO / "weights"))
    if (weights / "sam3.pt").exists():
        return weights, "WEIGHTS_DIR"
    weights = Path(tempfile.mkdtemp(prefix="bench-sam3-weights-"))
    # A child process, so that building the random model does not stay in this one's memory.
    script = REPO / "scripts" / "make_test_weights_sam3.py"
    subprocess.run([sys.executable, str(script), str(weights)], check=True, timeout=1800)
    return weights, "random (scripts/make_test_weights_sam3.py)"


def source_frames(count: int, size: tuple[int, int]) -> tuple[list[np.ndarray], str]:
    if STREET.exists():
        from core.media import iter_video_frames

        frames = [f.pixels for f in iter_video_frames(STREET, start_sec=1.0, max_frames=count)]
        return [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames], STREET.name
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(
        rng.integers(0, 255, (size[1], size[0] + 8 * count, 3), np.uint8), (9, 9), 3
    )
    return [base[:, 8 * i : 8 * i + size[0]].copy() for i in range(count)], "synthetic"


def mp4_b64(frames: list[np.ndarray], fps: float) -> str:
    from tests.splat_scene import encode_mp4

    with tempfile.TemporaryDirectory() as scratch:
        path = encode_mp4(frames, Path(scratch) / "clip.mp4", fps=fps)
        return base64.b64encode(path.read_bytes()).decode()


def jpeg_b64(pixels: np.ndarray) -> str:
    ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return base64.b64encode(buffer.tobytes()).decode()


def run_job(job_input: dict[str, Any]) -> tuple[dict[str, Any], float]:
    from core.apps import run_infer as run_infer_job

    started = time.perf_counter()
    result = run_infer_job({"id": "bench", "input": job_input})
    json.dumps(result)  # what the SDK does with it
    elapsed = time.perf_counter() - started
    if "error" in result:
        raise SystemExit(f"job failed: {result['error']}")
    return result, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--imgsz", default="1008,504", help="model input sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--max-objects", type=int, default=4)
    args = parser.parse_args()
    sizes = [int(s) for s in args.imgsz.split(",") if s.strip()]

    weights, what = prepare_weights()
    os.environ["WEIGHTS_DIR"] = str(weights)
    os.environ.setdefault("ALLOW_MODEL_DOWNLOADS", "false")
    import torch

    from core.tasks.sam3 import load_sam3

    common = {"device": "cpu", "torch_threads": torch.get_num_threads(), "weights": what}

    started = time.perf_counter()
    loaded = load_sam3("sam3.pt")
    emit(bench="sam3_load", seconds=round(time.perf_counter() - started, 1), **common)
    started = time.perf_counter()
    with loaded.lock:
        from core.tasks.sam3 import ensure_tracker

        ensure_tracker(loaded.model)
    emit(bench="sam3_tracker_load", seconds=round(time.perf_counter() - started, 1), **common)

    frames, source = source_frames(max(args.frames, 1), (640, 360))
    image = jpeg_b64(cv2.resize(frames[0], (640, 480), interpolation=cv2.INTER_AREA))
    for imgsz in sizes:
        job = {
            "task": "sam3-concept-segmentation",
            "image": image,
            "options": {"text_prompt": CONCEPTS, "imgsz": imgsz},
        }
        result, first = run_job(job)  # includes the concepts' text encoding
        times = [run_job(job)[1] for _ in range(args.repeats)]
        emit(
            bench="sam3_image_latency",
            image="640x480 jpeg",
            imgsz=result["imgsz"],
            concepts=CONCEPTS,
            first_job_s=round(first, 2),
            median_s=round(statistics.median(times), 2),
            repeats=args.repeats,
            instances=len(result["results"][0]["detections"]),
            frames_from=source,
            **common,
        )

    if args.frames:
        video = mp4_b64(frames, fps=10.0)
        for imgsz in sizes:
            options = {"text_prompt": CONCEPTS, "imgsz": imgsz, "max_objects": args.max_objects}
            result, elapsed = run_job(
                {"task": "sam3-concept-segmentation", "video": video, "options": options}
            )
            count = result["video"]["sampled_frames"]
            inference_s = result["timings_ms"].get("inference", 0.0) / 1000
            emit(
                bench="sam3_video_fps",
                frames=count,
                frame_size="640x360",
                imgsz=result["imgsz"],
                max_objects=args.max_objects,
                objects=len(result["tracks"]),
                fps=round(count / elapsed, 4),
                seconds_per_frame=round(elapsed / count, 2),
                inference_seconds_per_frame=round(inference_s / count, 2),
                frames_from=source,
                **common,
            )


if __name__ == "__main__":
    main()
