"""Benchmark of the SfM front half on the synthetic scene with known cameras; prints JSON lines.

    python bench/bench_sfm.py [--views 32] [--width 320] [--height 240] [--threads 2]
                              [--max-features 4096] [--matching sequential exhaustive]
                              [--seed 0]

Scene: tests/splat_scene.py (textured boxes on a textured ground, pinhole f = 0.875 x width,
views on an orbit of radius 5). Each view is encoded into an mp4 (libx264, crf 10) at 8 fps
together with a blurred copy (16 fps in all), then ``select_sharp_frames`` at 8 fps ->
``write_frames`` -> ``run_sfm``, once per matching mode. One line per step: render, encode,
select + write, then per mode the SfM stage times (extract, match, map), registered / total,
points, mean reprojection error and the camera-centre RMS error after a similarity
alignment to the truth (absolute and relative to the orbit radius).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.splat.frames import select_sharp_frames, write_frames
from core.splat.sfm import run_sfm
from tests.splat_scene import encode_mp4, pose_errors, render_views


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-features", type=int, default=4096)
    parser.add_argument("--matching", nargs="+", default=["sequential", "exhaustive"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import pycolmap

    t0 = time.perf_counter()
    images, _k, poses, scene = render_views(
        args.views, width=args.width, height=args.height, focal=0.875 * args.width, seed=args.seed
    )
    _emit(
        {
            "step": "render",
            "views": args.views,
            "size": [args.width, args.height],
            "ms": round((time.perf_counter() - t0) * 1000, 1),
            "pycolmap": pycolmap.__version__,
            "pycolmap_cuda": bool(pycolmap.has_cuda),
        }
    )

    with tempfile.TemporaryDirectory(prefix="bench-sfm-") as tmp:
        root = Path(tmp)
        frames = []
        for view in images:  # sharp first, then a blurred copy: selection must skip it
            frames += [view, cv2.GaussianBlur(view, (0, 0), 2.0)]
        t0 = time.perf_counter()
        video = encode_mp4(frames, root / "orbit.mp4", fps=16)
        _emit(
            {
                "step": "encode_mp4",
                "frames": len(frames),
                "bytes": video.stat().st_size,
                "ms": round((time.perf_counter() - t0) * 1000, 1),
            }
        )
        t0 = time.perf_counter()
        selected = select_sharp_frames(video, fps=8)
        names = write_frames(selected, root / "images")
        _emit(
            {
                "step": "select_and_write",
                "selected": len(names),
                "sharp_chosen": [f.index for f in selected] == list(range(0, len(frames), 2)),
                "ms": round((time.perf_counter() - t0) * 1000, 1),
            }
        )

        for mode in args.matching:
            result = run_sfm(
                root / "images",
                root / f"work-{mode}",
                matching=mode,
                num_threads=args.threads,
                max_features=args.max_features,
            )
            views = [int(Path(n).stem.split("_")[1]) for n in result.registered_names]
            errors = pose_errors(
                [im.rotation for im in result.images],
                np.array([im.center for im in result.images]),
                [poses[v][0] for v in views],
                np.array([-poses[v][0].T @ poses[v][1] for v in views]),
            )
            _emit(
                {
                    "step": "sfm",
                    "matching": mode,
                    "threads": args.threads,
                    "extract_ms": result.timings_ms["extract"],
                    "match_ms": result.timings_ms["match"],
                    "map_ms": result.timings_ms["map"],
                    "total_ms": result.timings_ms["total"],
                    "registered": result.num_registered,
                    "total": result.total_images,
                    "points": result.num_points,
                    "mean_reproj_error_px": round(result.mean_reprojection_error, 4),
                    "centre_rms": round(errors["centre_rms"], 5),
                    "centre_rms_rel_radius": round(errors["centre_rms"] / scene.radius, 5),
                    "rotation_rms_deg": round(errors["rotation_rms_deg"], 4),
                    "focal_px": round(result.images[0].intrinsics.fx, 2),
                    "focal_true_px": 0.875 * args.width,
                }
            )


if __name__ == "__main__":
    main()
