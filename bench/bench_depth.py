"""depth-estimation benchmarks: JSON lines on stdout, side by side in one run.

    python bench/bench_depth.py [--repeats 5] [--frames 16]

1. latency per 640x480 image: the whole job (base64 JPEG in, PNG16 out) against bare
   transformers (processor, model, resize to the image) on the same pixels, interleaved;
   at the processor's default input (518 short side) and at `input_size` 364;
2. frames per second on video (two passes, one scale, zip written to a temporary OUTPUT_DIR):
   a synthetic 640x360 mp4, and the real 1280x720 clip from ../shared/media when present.

Uses WEIGHTS_DIR's depth-anything-v2-small/ when present, else a random-weight checkpoint
of the same architecture (speed does not depend on the weights' values).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-"))
REAL_CLIP = REPO.parent / "shared" / "media" / "sam2_01_dog_walk.mp4"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def timed_ms(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def jpeg_b64(pixels: np.ndarray, quality: int = 90) -> str:
    ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return base64.b64encode(buffer.tobytes()).decode()


def test_frame(width: int, height: int) -> np.ndarray:
    if REAL_CLIP.exists():
        from core.media import iter_video_frames

        frame = next(iter(iter_video_frames(REAL_CLIP, start_sec=1.0, max_frames=1)))
        return cv2.resize(frame.pixels, (width, height), interpolation=cv2.INTER_AREA)
    from tests.conftest import scene_image

    return scene_image(width, height, seed=5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=16, help="sampled frames per clip")
    args = parser.parse_args()

    weights = Path(os.environ.get("WEIGHTS_DIR", REPO / "weights"))
    real_weights = (weights / "depth-anything-v2-small" / "config.json").exists()
    if not real_weights:
        from scripts.make_test_weights_depth import make_depth_checkpoint

        weights = Path(tempfile.mkdtemp(prefix="bench-weights-"))
        atexit.register(shutil.rmtree, weights, ignore_errors=True)
        make_depth_checkpoint(weights)
    out_dir = Path(tempfile.mkdtemp(prefix="bench-depth-out-"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    os.environ["WEIGHTS_DIR"] = str(weights)
    os.environ["OUTPUT_DIR"] = str(out_dir)
    os.environ.setdefault("ALLOW_MODEL_DOWNLOADS", "false")

    import torch

    from core.apps import run_infer as run_infer_job
    from core.media import decode_image
    from core.tasks.depth import load_depth, resize_depth

    common = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "weights": "given" if real_weights else "random (same architecture)",
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),  # a shared CPU skews timings
    }
    loaded = load_depth("depth-anything-v2-small")
    depth_model = loaded.model

    # 1. One 640x480 image: the job against bare transformers, interleaved.
    vga = test_frame(640, 480)
    vga_b64 = jpeg_b64(vga)
    pixels = decode_image(base64.b64decode(vga_b64), max_pixels=10**8).pixels
    rgb = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    for input_size in (None, 364):
        size = {"size": {"height": input_size, "width": input_size}} if input_size else {}
        options = {"input_size": input_size} if input_size else {}
        job = {"id": "bench", "input": {"task": "depth-estimation", "image": vga_b64}}
        job["input"]["options"] = options

        def bare(size: dict[str, Any] = size) -> np.ndarray:
            inputs = depth_model.processor(images=[rgb], return_tensors="pt", **size)
            with torch.inference_mode():
                raw = depth_model.model(**inputs).predicted_depth
            return resize_depth(depth_model, raw[0], 480, 640)

        def handler(job: dict[str, Any] = job) -> None:
            result = run_infer_job(job)
            assert "error" not in result, result

        bare(), handler()  # warm
        bare_ms, handler_ms = [], []
        for _ in range(args.repeats):
            bare_ms.append(timed_ms(bare))
            handler_ms.append(timed_ms(handler))
        b, h = statistics.median(bare_ms), statistics.median(handler_ms)
        model_input = depth_model.processor(images=[rgb], return_tensors="pt", **size)
        emit(
            bench="depth_image_latency",
            image="640x480 jpeg base64",
            model_input="x".join(str(v) for v in model_input["pixel_values"].shape[-2:][::-1]),
            handler_ms=round(h, 1),
            bare_transformers_ms=round(b, 1),
            ratio=round(h / b, 3),
            images_per_s=round(1000 / h, 2),
            **common,
        )

    # 2. Video: frames per second of the whole task (both passes, zip to OUTPUT_DIR).
    from scripts.synthetic_video import moving_shapes_clip
    from tests.splat_scene import encode_mp4

    clip = moving_shapes_clip(
        2, width=640, height=360, frame_count=args.frames, fps=12.0, texture=30
    )
    synthetic = encode_mp4(clip.frames, out_dir / "synthetic.mp4", fps=12.0)
    clips = [("synthetic 640x360", synthetic, {})]
    if REAL_CLIP.exists():
        clips.append((f"{REAL_CLIP.name} 1280x720", REAL_CLIP, {}))
        clips.append((f"{REAL_CLIP.name} max_side 640", REAL_CLIP, {"max_side": 640}))
    for label, path, extra in clips:
        video_b64 = base64.b64encode(path.read_bytes()).decode()
        options = {"max_frames": args.frames, **extra}
        job = {"id": "bench", "input": {"task": "depth-estimation", "video": video_b64}}
        job["input"]["options"] = options
        started = time.perf_counter()
        result = run_infer_job(job)
        wall_s = time.perf_counter() - started
        assert "error" not in result, result
        frames = result["video"]["sampled_frames"]
        timings = result["timings_ms"]
        emit(
            bench="depth_video_fps",
            clip=label,
            frames=frames,
            frames_per_s=round(frames / wall_s, 3),
            ms_per_frame={
                stage: round(timings.get(stage, 0.0) / frames, 1)
                for stage in ("decode", "inference", "resize", "encode", "upload")
            },
            archive_bytes=result["archive"]["bytes"],
            **common,
        )


if __name__ == "__main__":
    main()
