"""SAM 2 benchmarks: JSON lines on stdout.

    python bench/bench_sam2.py [--repeats 3] [--frames 8] [--model sam2.1_hiera_tiny.pt]

- image latency at 640x480 through the job runner: a new image (image encoder + prompts)
  and the same image again (its embedding reused: prompts only), one and three objects;
- video propagation: frames per second of a whole job (frames decoded, SAM 2 state set up,
  one or two objects prompted on frame 0 and propagated), and of the propagation alone.

Uses WEIGHTS_DIR's checkpoint when present, else a random-weight one of the same architecture
(speed does not depend on the weights' values). Real footage from ../shared/media gives the
clip when present, else a synthetic one.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import os
import shutil
import statistics
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

WIDTH, HEIGHT = 640, 480


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def png_b64(pixels: np.ndarray) -> str:
    return base64.b64encode(cv2.imencode(".png", pixels)[1].tobytes()).decode()


def clip_frames(count: int) -> tuple[list[np.ndarray], str]:
    """`count` frames at 640 px wide: real footage when present, else moving shapes."""
    video = REPO.parent / "shared" / "media" / "sam2_01_dog_walk.mp4"
    if video.exists():
        from core.media import iter_video_frames

        frames = [f.pixels for f in iter_video_frames(video, max_frames=count, max_side=640)]
        return frames, video.name
    from scripts.synthetic_video import moving_shapes_clip

    clip = moving_shapes_clip(0, width=640, height=360, frame_count=count, texture=30.0)
    return clip.frames, "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--model", default="sam2.1_hiera_tiny.pt")
    args = parser.parse_args()

    weights = Path(os.environ.get("WEIGHTS_DIR", REPO / "weights"))
    if not (weights / args.model).exists():
        from scripts.make_test_weights_sam2 import make_sam2_checkpoint

        weights = Path(tempfile.mkdtemp(prefix="bench-weights-"))
        atexit.register(shutil.rmtree, weights, ignore_errors=True)  # 150 MB and more
        make_sam2_checkpoint(weights, args.model)
    os.environ["WEIGHTS_DIR"] = str(weights)
    os.environ.setdefault("ALLOW_MODEL_DOWNLOADS", "false")

    import torch

    from core.apps import run_infer as run_infer_job
    from core.models import worker_device
    from scripts.synthetic_shapes import render_scene

    common = {"model": args.model, "device": worker_device(), "threads": torch.get_num_threads()}
    run_infer_job({"id": "load", "input": {"task": "health"}})  # imports, not timed

    def job(payload: dict[str, Any]) -> dict[str, Any]:
        result = run_infer_job({"id": "bench", "input": payload})
        if "error" in result:
            raise SystemExit(f"benchmark job failed: {result['error']}")
        return result

    one = [{"id": 0, "points": [[320, 240]]}]
    three = [
        {"id": 0, "points": [[320, 240]]},
        {"id": 1, "box": [40, 40, 300, 300]},
        {
            "id": 2,
            "box": [340, 200, 620, 460],
            "points": [[480, 330], [600, 220]],
            "labels": [1, 0],
        },
    ]

    def scenes(first_seed: int) -> list[str]:
        seeds = range(first_seed, first_seed + args.repeats)
        return [png_b64(render_scene(seed, WIDTH, HEIGHT)[0]) for seed in seeds]

    warm = {"task": "sam2-segmentation", "image": scenes(1000)[0], "options": {"objects": one}}
    job(warm)  # loads the model
    for group, (name, objects) in enumerate((("1 object", one), ("3 objects", three))):
        new, same = [], []
        for image in scenes(100 * group):  # images this process has not seen yet
            payload = {"task": "sam2-segmentation", "image": image, "options": {"objects": objects}}
            for times in (new, same):  # first sight of the image, then the same pixels again
                started = time.perf_counter()
                result = job(payload)
                times.append((time.perf_counter() - started) * 1000)
            assert result["results"][0]["image_embedding"] == "cached"
        emit(
            bench="sam2_image_latency",
            size=f"{WIDTH}x{HEIGHT}",
            objects=name,
            new_image_ms=round(statistics.median(new), 1),
            same_image_ms=round(statistics.median(same), 1),
            repeats=args.repeats,
            **common,
        )

    frames, source = clip_frames(args.frames)
    height, width = frames[0].shape[:2]
    clip = [png_b64(frame) for frame in frames]
    prompts = [
        {"id": 0, "points": [[width / 2, height / 2]]},
        {"id": 1, "box": [width * 0.1, height * 0.1, width * 0.4, height * 0.6]},
    ]
    for count in (1, 2):
        started = time.perf_counter()
        result = job(
            {
                "task": "sam2-segmentation",
                "frames": clip,
                "fps": 30,
                "options": {"objects": prompts[:count]},
            }
        )
        seconds = time.perf_counter() - started
        inference_s = result["timings_ms"]["inference"] / 1000
        emit(
            bench="sam2_video_propagation",
            source=source,
            size=f"{width}x{height}",
            frames=len(frames),
            objects=count,
            job_fps=round(len(frames) / seconds, 3),
            inference_fps=round(len(frames) / inference_s, 3),
            ms_per_frame=round(1000 * inference_s / len(frames), 1),
            **common,
        )


if __name__ == "__main__":
    main()
