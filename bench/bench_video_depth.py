"""Consistent video depth (core/stages/video_depth.py) benchmarks: JSON lines on stdout.

    python bench/bench_video_depth.py [--frames 48] [--model-frames 4]

1. flicker and accuracy on the rendered orbit clip (tests/orbit_scene.py, 320x240, true depth)
   through the simulated per-frame model of tests/test_video_depth.py (own scale and shift per
   frame, noise, a slow smooth error, a few wild pixels): per-frame min/max normalisation
   (the old backends), the chain alone, the chain with the range hold (the default), and with
   anchors (true inverse depth at 300 pixels of every 4th frame); alignment time per frame;
2. the model per frame: a random-weight Depth Anything V2 Small (speed does not depend on the
   weights' values) at its default input size on 640x480 frames, and the alignment's time per
   frame at that size.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=48, help="frames of the rendered clip")
    parser.add_argument("--model-frames", type=int, default=4, help="640x480 frames for the model")
    args = parser.parse_args()

    import torch

    from core.stages import video_depth as vd
    from tests.orbit_scene import orbit_clip
    from tests.test_video_depth import (
        anchors_every,
        global_affine_error,
        scale_drift,
        simulate_model,
    )

    common = {
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),  # a shared CPU skews timings
    }
    clip = orbit_clip(args.frames, with_background=False)
    sim = simulate_model(clip)
    truth_flicker = vd.flicker(sim.inverse, clip.frames, clip.masks)
    variants: list[tuple[str, dict[str, Any] | None]] = [
        ("per-frame min/max", None),
        ("chain only", {"range_window": None}),
        ("chain + range hold (default)", {}),
        ("chain + anchors every 4th frame", {"anchors": anchors_every(sim, 4, 300)}),
    ]
    for label, options in variants:
        started = time.perf_counter()
        if options is None:
            depths = vd.normalise_per_frame(sim.raw)
        else:
            depths, _ = vd.align_disparity(sim.raw, clip.frames, clip.masks, **options)
        ms_per_frame = (time.perf_counter() - started) * 1000 / len(depths)
        emit(
            bench="video_depth_flicker",
            clip=f"orbit {clip.width}x{clip.height}, {len(depths)} frames, simulated model",
            method=label,
            flicker=round(vd.flicker(depths, clip.frames, clip.masks), 5),
            true_depth_flicker=round(truth_flicker, 5),
            one_affine_median_rel_error=round(global_affine_error(depths, sim.inverse), 4),
            scale_drift=round(scale_drift(depths, sim), 4),
            ms_per_frame=round(ms_per_frame, 1),
            **common,
        )

    # 2. The model per frame at 640x480 (random weights), then the alignment at that size.
    weights = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    atexit.register(shutil.rmtree, weights, ignore_errors=True)
    from scripts.make_test_weights_depth import make_depth_checkpoint

    make_depth_checkpoint(weights)
    os.environ["WEIGHTS_DIR"] = str(weights)
    os.environ["ALLOW_MODEL_DOWNLOADS"] = "false"
    from core.tasks.depth import DEFAULT_MODEL, load_depth, model_input_size

    loaded = load_depth(DEFAULT_MODEL)
    frames = [
        cv2.resize(f, (640, 480), interpolation=cv2.INTER_LINEAR)
        for f in clip.frames[: args.model_frames]
    ]
    vd.estimate_disparity(loaded, frames[:1], batch=1)  # warm
    size = model_input_size(loaded.model, 640, 480, None)
    started = time.perf_counter()
    raw = vd.estimate_disparity(loaded, frames, batch=1)
    model_ms = (time.perf_counter() - started) * 1000 / len(frames)
    masks = [
        cv2.resize(m.astype("uint8"), (640, 480), interpolation=cv2.INTER_NEAREST) > 0
        for m in clip.masks[: args.model_frames]
    ]
    started = time.perf_counter()
    vd.align_disparity(raw, frames, masks)
    align_ms = (time.perf_counter() - started) * 1000 / len(frames)
    emit(
        bench="video_depth_model",
        frames=f"{len(frames)} x 640x480",
        model="depth-anything-v2-small (random weights, same architecture)",
        device=loaded.model.device,
        model_input=None if size is None else f"{size[0]}x{size[1]}",
        model_ms_per_frame=round(model_ms, 1),
        align_ms_per_frame=round(align_ms, 1),
        **common,
    )


if __name__ == "__main__":
    main()
