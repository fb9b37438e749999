"""Orbit's five-stage job on this machine: per-stage time and frames per second; JSON lines.

    python bench/bench_orbit.py [--seconds 10] [--fps 10] [--width 640] [--height 480]

The clip is rendered with known truth (tests/orbit_scene.py: a textured subject walking with a
camera on a 40 degree arc), encoded to mp4 and submitted as Orbit submits a real clip (an
upload, then `video_id`; here `video` as base64, the same bytes) through the real job runner
in this process. Models are the real architectures with random weights (SAM 2.1 tiny, Depth
Anything V2 small): speed does not depend on the weights' values, but SAM 2's masks do, so
the masked solve sees whatever random masks SAM 2 makes; `bench_camera_solve.py` measures the
solve on the true masks. One line per stage (ms, frames per second) and one for the job.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-"))

STAGES = ("segmentation", "pose-estimation", "depth-estimation", "tracking", "quality-check")


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=10.0, help="Orbit's target_fps")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args()

    from scripts.make_test_weights_depth import make_depth_checkpoint
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint
    from tests.orbit_scene import orbit_clip
    from tests.splat_scene import encode_mp4

    work = Path(tempfile.mkdtemp(prefix="bench-orbit-"))
    weights = work / "weights"
    weights.mkdir()
    make_sam2_checkpoint(weights, "sam2.1_hiera_tiny.pt")
    make_depth_checkpoint(weights)
    os.environ.update(
        WEIGHTS_DIR=str(weights),
        OUTPUT_DIR=str(work / "outputs"),
        WORK_DIR=str(work),
        ORBIT_SAM2_MODEL="sam2.1_hiera_tiny.pt",
    )
    frames = round(args.seconds * args.fps)
    started = time.perf_counter()
    clip = orbit_clip(
        frames,
        width=args.width,
        height=args.height,
        focal=0.8 * args.width,
        fps=args.fps,
        with_background=False,
    )
    video = encode_mp4(clip.frames, work / "clip.mp4", fps=args.fps, crf=14)
    emit(bench="orbit_render", frames=frames, ms=round((time.perf_counter() - started) * 1000))

    import numpy as np

    import core.apps

    centre = np.argwhere(clip.masks[0]).mean(axis=0)
    job = {
        "id": "bench-orbit",
        "input": {
            "video": base64.b64encode(video.read_bytes()).decode(),
            "target_fps": args.fps,
            "max_frames": frames,
            "prompt_points": [{"x": float(centre[1]), "y": float(centre[0])}],
        },
    }
    started = time.perf_counter()
    result = core.apps.run_infer(job)
    total_ms = (time.perf_counter() - started) * 1000
    if "error" in result:
        emit(bench="orbit_job", error=result["error"], error_code=result.get("error_code"))
        sys.exit(1)
    timings = result["timings_ms"]
    count = result["frame_count"]
    for stage in STAGES:
        ms = timings.get(stage)
        if ms is None and stage == "quality-check":
            ms = timings.get("upload")
        emit(
            bench="orbit_stage",
            stage=stage,
            frames=count,
            size=f"{args.width}x{args.height}",
            ms=round(ms, 1) if ms is not None else None,
            frames_per_s=round(count / (ms / 1000), 2) if ms else None,
        )
    emit(
        bench="orbit_job",
        seconds=args.seconds,
        frames=count,
        size=f"{args.width}x{args.height}",
        total_ms=round(total_ms),
        decode_ms=timings.get("decode"),
        load_model_ms=timings.get("load_model"),
        mode=result["mode"],
        registered=result["quality"]["pose"].get("registered"),
        tracks_kept=result["quality"]["track"].get("num_tracks_kept"),
    )


if __name__ == "__main__":
    main()
