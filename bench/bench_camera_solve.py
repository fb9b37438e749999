"""Camera solve with the subject masked vs unmasked, and the SIFT quality presets; JSON lines.

    python bench/bench_camera_solve.py [--frames 24 48] [--arc 60] [--threads 2]
                                       [--quality-size 640 480] [--quality-frames 24]
                                       [--clips /work/shared/media/*.mp4] [--clip-fps 3]
                                       [--clip-max-side 960] [--clip-max-frames 24]

Synthetic follow clip (tests/orbit_scene.py: the subject walks with the camera, known camera
path and focal length). Part 1, per frame count at 320x240 and the "low" preset: the same
frames through core.stages.camera.solve_camera with the true subject masks and without
masks; one line each with the time per step, registered/total, the camera-centre RMS as a
percentage of the path length (after a similarity alignment to the truth), the focal error
and pose_quality's score. A solve that fails says so (``failed`` and COLMAP's reason).
Part 2: the masked solve at each SIFT preset (low/medium/high: 2048/8192/16384 features)
on the synthetic clip at ``--quality-size`` (its texture gives only ~600-700 SIFT features a
frame even at 1280x960, so the caps do not bind there: those lines show time and accuracy
per preset; CPU SIFT still takes longer with a larger cap), then on
real clips (``--clips``; sharpest frame per 1/fps window, unmasked, no truth) where they do:
time per step and registered frames side by side.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import SfmFailed
from core.splat.frames import iter_sharp_frames
from core.stages.camera import QUALITY_FEATURES, CameraSolve, pose_quality, solve_camera
from tests.orbit_scene import OrbitClip, orbit_clip
from tests.splat_scene import pose_errors

FOCAL_AT_320 = 260.0  # orbit_clip's default focal length at 320 px wide


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _accuracy(solve: CameraSolve, clip: OrbitClip) -> dict[str, Any]:
    registered = [p for p in solve.poses if p.registered and p.world_to_camera is not None]
    frames = [p.frame for p in registered]
    errors = pose_errors(
        [p.world_to_camera[:3, :3] for p in registered],  # type: ignore[index]
        np.array([p.centre for p in registered]),
        [clip.poses[f][0] for f in frames],
        clip.centres[frames],
    )
    focal = float(clip.k[0, 0])
    return {
        "centre_rms_pct_path": round(100 * errors["centre_rms"] / clip.path_length, 3),
        "rotation_rms_deg": round(errors["rotation_rms_deg"], 3),
        "focal_err_pct": round(100 * abs(solve.intrinsics["fx"] - focal) / focal, 2),
    }


def _solve(
    label: dict[str, Any],
    frames: list[np.ndarray],
    masks: list[np.ndarray] | None,
    clip: OrbitClip | None,
    quality: str,
    work: Path,
    threads: int,
) -> None:
    """One solve and its line; ``clip`` (the truth) adds the accuracy numbers."""
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    record: dict[str, Any] = {**label, "masked": masks is not None, "quality": quality,
                              "max_features": QUALITY_FEATURES[quality]}  # fmt: skip
    try:
        solve = solve_camera(frames, masks, work, quality=quality, num_threads=threads)
    except SfmFailed as exc:
        record.update(failed=True, wall_s=round(time.perf_counter() - t0, 2),
                      reason=exc.message[:300], registered=exc.details.get("registered"),
                      total=exc.details.get("total"))  # fmt: skip
        _emit(record)
        return
    quality_metrics = pose_quality(solve, len(frames))
    record.update(
        wall_s=round(time.perf_counter() - t0, 2),
        steps_s={k: round(v / 1000, 2) for k, v in solve.timings_ms.items()},
        registered=quality_metrics["registered"],
        total=quality_metrics["total"],
        points=len(solve.points),
        mean_keypoints=round(float(np.mean([p.num_keypoints for p in solve.poses])), 1),
        **(_accuracy(solve, clip) if clip is not None else {}),
        median_reproj_px=quality_metrics["median_reprojection_error"],
        score=quality_metrics["score"],
        jitter=quality_metrics["jitter_score"],
    )
    _emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="*", default=[24, 48])
    parser.add_argument("--arc", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality-size", type=int, nargs=2, default=[640, 480])
    parser.add_argument("--quality-frames", type=int, default=24)
    parser.add_argument("--clips", nargs="*", default=sorted(glob.glob("/work/shared/media/*.mp4")))
    parser.add_argument("--clip-fps", type=float, default=3.0)
    parser.add_argument("--clip-max-side", type=int, default=960)
    parser.add_argument("--clip-max-frames", type=int, default=24)
    args = parser.parse_args()

    import pycolmap

    _emit({"bench": "camera_solve", "pycolmap": pycolmap.__version__,
           "cuda": bool(pycolmap.has_cuda), "threads": args.threads,
           "arc_deg": args.arc})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-camera-") as tmp:
        root = Path(tmp)
        for n in args.frames:
            t0 = time.perf_counter()
            clip = orbit_clip(n, arc_deg=args.arc, follow=True, with_background=False)
            label = {"part": "mask", "frames": n, "size": [clip.width, clip.height],
                     "render_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
            for masks in (clip.masks, None):
                work = root / f"mask-{n}-{masks is not None}"
                _solve(label, clip.frames, masks, clip, "low", work, args.threads)
        width, height = args.quality_size
        t0 = time.perf_counter()
        clip = orbit_clip(
            args.quality_frames,
            width=width,
            height=height,
            focal=FOCAL_AT_320 * width / 320,
            arc_deg=args.arc,
            follow=True,
            with_background=False,
        )
        label = {"part": "quality", "frames": args.quality_frames, "size": [width, height],
                 "render_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
        for quality in QUALITY_FEATURES:
            work = root / f"quality-{quality}"
            _solve(label, clip.frames, clip.masks, clip, quality, work, args.threads)
        for path in args.clips:
            # Real footage: no masks (that needs a segmenter) and no truth; time and frames.
            t0 = time.perf_counter()
            frames = [
                f.pixels
                for f in iter_sharp_frames(
                    Path(path).read_bytes(),
                    fps=args.clip_fps,
                    max_side=args.clip_max_side,
                    max_frames=args.clip_max_frames,
                )
            ]
            label = {"part": "quality", "clip": Path(path).name, "frames": len(frames),
                     "size": [frames[0].shape[1], frames[0].shape[0]],
                     "decode_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
            for quality in QUALITY_FEATURES:
                work = root / f"clip-{quality}"
                _solve(label, frames, None, None, quality, work, args.threads)


if __name__ == "__main__":
    main()
