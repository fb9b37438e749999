"""Video benchmarks: JSON lines on stdout, all measured in one process, one after the other.

    python bench/bench_video.py [--frames 30] [--raft-frames 8] [--repeats 2]

Frames per second, through the worker's own job runner (warm models, whole job: base64
decode, video decode, detection, tracking, flow, JSON), at imgsz 640 (flow at 640 px too):
  * object-detection on video with ByteTrack,
  * velocity-estimation with RAFT (raft_small) and with DIS,
plus the bare optical flow per frame pair at 640 px for each backend.

Weights: WEIGHTS_DIR's yolo11n.pt and raft_small.pth when present, else random-weight
checkpoints of the same architectures (speed does not depend on the weights' values). A
random detector finds nothing, which would skip tracking and flow, so its class bias is
raised to give confident boxes on every frame (`max_det` of them). Footage: the 1080p street
clip of ../shared/media when present, else a synthetic 1280x720 clip.
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-"))

STREET = REPO.parent / "shared" / "media" / "street_pedestrians_cyclist_1080p.mp4"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def prepare_weights() -> tuple[Path, str, str]:
    """(weights dir, detector name, what the weights are)."""
    weights = Path(os.environ.get("WEIGHTS_DIR", REPO / "weights"))
    if (weights / "yolo11n.pt").exists() and (weights / "raft_small.pth").exists():
        return weights, "yolo11n.pt", "WEIGHTS_DIR"
    import torch
    from ultralytics import YOLO

    from scripts.make_test_weights import make_yolo_checkpoints
    from scripts.make_test_weights_raft import make_raft_checkpoint

    weights = Path(tempfile.mkdtemp(prefix="bench-video-weights-"))
    make_yolo_checkpoints(weights)
    make_raft_checkpoint(weights)
    model = YOLO(str(weights / "yolo11n.pt"))
    with torch.no_grad():
        for branch in model.model.model[-1].cv3:
            branch[-1].bias[0] = 6.0  # confident "person" boxes everywhere
    model.save(weights / "yolo11n-confident.pt")
    return weights, "yolo11n-confident.pt", "random (class bias raised)"


def footage() -> tuple[str, str]:
    """(base64 mp4, where it came from)."""
    if STREET.exists():
        return base64.b64encode(STREET.read_bytes()).decode(), STREET.name
    from scripts.synthetic_video import moving_shapes_clip
    from tests.splat_scene import encode_mp4

    clip = moving_shapes_clip(
        0, width=1280, height=720, frame_count=90, fps=30, shapes=3, texture=15.0
    )
    path = Path(tempfile.mkdtemp(prefix="bench-video-")) / "synthetic.mp4"
    encode_mp4(clip.frames, path, clip.fps, crf=20)
    return base64.b64encode(path.read_bytes()).decode(), "synthetic 1280x720"


def frame_pair_640() -> tuple[np.ndarray, np.ndarray]:
    from core.media import iter_video_frames

    if STREET.exists():
        frames = list(iter_video_frames(STREET, start_sec=2.0, max_frames=2, max_side=640))
        return frames[0].pixels, frames[1].pixels
    rng = np.random.default_rng(0)
    first = rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)
    return first, np.roll(first, 3, axis=1)


def job_fps(
    run_infer_job: Any, job_input: dict[str, Any], repeats: int
) -> tuple[float, dict[str, Any]]:
    """Median sampled frames per second of the whole job (model load excluded: warm)."""
    rates, last = [], {}
    for _ in range(repeats):
        started = time.perf_counter()
        last = run_infer_job({"id": "bench", "input": job_input})
        elapsed = time.perf_counter() - started
        if "error" in last:
            raise SystemExit(f"benchmark job failed: {last['error']}")
        rates.append(last["video"]["sampled_frames"] / elapsed)
    return statistics.median(rates), last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=30, help="frames for detection and DIS")
    parser.add_argument("--raft-frames", type=int, default=8, help="frames for RAFT (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-det", type=int, default=10)
    args = parser.parse_args()

    weights, detector, weights_kind = prepare_weights()
    os.environ["WEIGHTS_DIR"] = str(weights)
    os.environ.setdefault("ALLOW_MODEL_DOWNLOADS", "false")

    import torch

    from core.apps import run_infer as run_infer_job
    from core.models import worker_device
    from core.tasks._flow import DisFlow, RaftFlow, load_raft

    video, source = footage()
    device = worker_device()
    common = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "footage": source,
        "weights": weights_kind,
        "imgsz": 640,
        # The machine may be shared: a load above the core count slows every number here.
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    window = {"start_sec": 1.0, "imgsz": 640, "max_det": args.max_det}

    def job(task: str, frames: int, **options: Any) -> dict[str, Any]:
        return {
            "task": task,
            "model": detector,
            "video": video,
            "options": {**window, "max_frames": frames, **options},
        }

    # Warm every model and code path once, with the job's own shapes.
    run_infer_job({"id": "warm", "input": job("object-detection", 2)})
    run_infer_job({"id": "warm", "input": job("velocity-estimation", 2, flow="raft")})

    fps, result = job_fps(run_infer_job, job("object-detection", args.frames), args.repeats)
    emit(
        bench="video_detection_tracking_fps",
        fps=round(fps, 2),
        frames=result["video"]["sampled_frames"],
        tracker=result["tracker"],
        tracks=len(result["tracks"]),
        timings_ms=result["timings_ms"],
        **common,
    )
    for flow, frames in (("raft", args.raft_frames), ("dis", args.frames)):
        fps, result = job_fps(
            run_infer_job, job("velocity-estimation", frames, flow=flow), args.repeats
        )
        emit(
            bench=f"video_velocity_{flow}_fps",
            fps=round(fps, 2),
            frames=result["video"]["sampled_frames"],
            flow_working_size=result["flow"]["working_size"],
            tracks=len(result["tracks"]),
            timings_ms=result["timings_ms"],
            **common,
        )

    # The flow alone, per frame pair at 640 px.
    first, second = frame_pair_640()
    backends = {"raft": RaftFlow(load_raft(), device), "dis": DisFlow()}
    for name, backend in backends.items():
        backend(first, second)  # warm
        times = []
        for _ in range(max(3, args.repeats * 2)):
            started = time.perf_counter()
            backend(first, second)
            times.append((time.perf_counter() - started) * 1000)
        emit(
            bench=f"flow_{name}_pair_ms",
            ms=round(statistics.median(times), 1),
            size=[first.shape[1], first.shape[0]],
            **common,
        )


if __name__ == "__main__":
    main()
