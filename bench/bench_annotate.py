"""Annotated video benchmark: JSON lines on stdout, all measured in one process.

    python bench/bench_annotate.py [--frames 90] [--repeats 2] [--width 640 --height 360]

On a synthetic clip (moving textured shapes, 30 fps) found by the committed shapes detector
(`weights/shapes-yolo11.pt`), through the worker's own job runner with warm models (whole job:
base64 decode, video decode, detection, tracking, JSON):
  * `annotate_job_fps`: frames per second of object-detection (and velocity-estimation with
    DIS flow) without and with `annotate`, and the `annotate` stage (drawing + H.264 encoding,
    from the result's `timings_ms`) as a share of the annotated job's total (target <= 15%);
  * `annotate_frame_ms`: per frame, drawing alone (supervision) and encoding alone (PyAV
    libx264, veryfast, crf 23) at the clip's size.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-"))
os.environ.setdefault("WEIGHTS_DIR", str(REPO / "weights"))
os.environ.setdefault("ALLOW_MODEL_DOWNLOADS", "false")

DETECTOR = "shapes-yolo11.pt"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def make_clip(width: int, height: int, frames: int) -> tuple[Any, str]:
    from scripts.synthetic_video import moving_shapes_clip
    from tests.splat_scene import encode_mp4

    clip = moving_shapes_clip(
        2,
        width=width,
        height=height,
        frame_count=frames,
        fps=30.0,
        shapes=2,
        texture=15.0,
        velocities=[(3.0, 1.0), (-2.0, 0.5)],
    )
    path = Path(tempfile.mkdtemp(prefix="bench-annotate-")) / "clip.mp4"
    encode_mp4(clip.frames, path, clip.fps, crf=20)
    return clip, base64.b64encode(path.read_bytes()).decode()


def run_job(run_infer: Any, job_input: dict[str, Any], repeats: int) -> tuple[float, dict]:
    """Median sampled frames per second of the whole job, and the last result."""
    rates, last = [], {}
    for _ in range(repeats):
        started = time.perf_counter()
        last = run_infer({"id": "bench-annotate", "input": job_input})
        elapsed = time.perf_counter() - started
        if "error" in last:
            raise SystemExit(f"benchmark job failed: {last['error']}")
        rates.append(last["video"]["sampled_frames"] / elapsed)
    return statistics.median(rates), last


def per_frame_ms(clip: Any, repeats: int) -> dict[str, float]:
    """Drawing alone and encoding alone, per frame, on the clip's frames and true boxes."""
    from core.annotate import VideoWriter, draw_entries

    frames = clip.frames
    entries = [
        [
            {
                "box": list(shape.boxes[n]),
                "class_id": i,
                "label": shape.class_name,
                "confidence": 0.9,
                "track_id": i + 1,
            }
            for i, shape in enumerate(clip.shapes)
        ]
        for n in range(len(frames))
    ]
    height, width = frames[0].shape[:2]
    draw, encode = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        drawn = [draw_entries(f, e) for f, e in zip(frames, entries, strict=True)]
        draw.append((time.perf_counter() - started) * 1000 / len(frames))
        started = time.perf_counter()
        with VideoWriter(30.0, width, height) as writer:
            for n, pixels in enumerate(drawn):
                writer.write(pixels, n / 30)
            writer.close().unlink()
        encode.append((time.perf_counter() - started) * 1000 / len(frames))
    return {"draw_ms": statistics.median(draw), "encode_ms": statistics.median(encode)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-velocity", action="store_true", help="detection only")
    args = parser.parse_args()

    import torch

    from core.apps import run_infer
    from core.models import worker_device

    clip, video = make_clip(args.width, args.height, args.frames)
    common = {
        "device": worker_device(),
        "torch_threads": torch.get_num_threads(),
        "clip": f"synthetic {args.width}x{args.height} 30 fps",
        "model": DETECTOR,
        "imgsz": 640,
        # The machine may be shared: a load above the core count slows every number here.
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    tasks = [("object-detection", {})]
    if not args.no_velocity:
        tasks.append(("velocity-estimation", {"flow": "dis"}))

    for task, extra in tasks:
        job = {
            "task": task,
            "model": DETECTOR,
            "video": video,
            "options": {"imgsz": 640, "max_frames": args.frames, **extra},
        }
        # Warm the model, the tracker and supervision's import with the job's own shapes.
        run_infer(
            {
                "id": "warm",
                "input": {**job, "annotate": True, "options": {**job["options"], "max_frames": 3}},
            }
        )
        plain_fps, plain = run_job(run_infer, job, args.repeats)
        annotated_fps, annotated = run_job(run_infer, {**job, "annotate": True}, args.repeats)
        timings = annotated["timings_ms"]
        sampled = annotated["video"]["sampled_frames"]
        emit(
            bench="annotate_job_fps",
            task=task,
            frames=sampled,
            fps_without=round(plain_fps, 2),
            fps_with=round(annotated_fps, 2),
            slowdown_pct=round(100 * (1 - annotated_fps / plain_fps), 1),
            annotate_ms=timings["annotate"],
            annotate_ms_per_frame=round(timings["annotate"] / sampled, 2),
            annotate_share_pct=round(100 * timings["annotate"] / timings["total"], 1),
            target_share_pct=15,
            mp4_bytes=annotated["annotated_video"]["bytes"],
            timings_ms_with=timings,
            timings_ms_without=plain["timings_ms"],
            **common,
        )

    alone = per_frame_ms(clip, args.repeats)
    emit(
        bench="annotate_frame_ms",
        size=[args.width, args.height],
        frames=len(clip.frames),
        draw_ms=round(alone["draw_ms"], 2),
        encode_ms=round(alone["encode_ms"], 2),
        **common,
    )


if __name__ == "__main__":
    main()
