"""Incremental vs global (GLOMAP) mapping, side by side; prints JSON lines.

    python bench/bench_mapper.py [--views 32 120] [--threads 2] [--features medium]
                                 [--clips /work/shared/media/*.mp4] [--clip-fps 2]
                                 [--clip-max-side 640] [--clip-max-frames 60]

Synthetic orbit (tests/splat_scene.py: known cameras, 320x240): per view count, the same
frames go through the whole of run_sfm once per mapper (same seeds, so the same features and
matches); one line each with the mapping time, registered frames, points, reprojection error and
the camera-centre RMS after a similarity alignment to the truth. Real clips: frames as the
worker picks them (sharpest per 1/fps window), then the same comparison without a truth;
a clip that does not register says so in its line (``skipped`` and why).
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

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import SfmFailed
from core.splat.frames import iter_sharp_frames, write_frames
from core.splat.sfm import FEATURE_LEVELS, run_sfm
from tests.splat_scene import pose_errors, render_views

MAPPERS = ("incremental", "global")


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _compare(
    label: dict[str, Any], image_dir: Path, root: Path, args: argparse.Namespace, truth: Any
) -> None:
    for mapper in MAPPERS:
        work = root / f"work-{mapper}"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            result = run_sfm(
                image_dir,
                work,
                mapper=mapper,  # type: ignore[arg-type]
                num_threads=args.threads,
                max_features=FEATURE_LEVELS[args.features],
                max_image_side=args.clip_max_side,
            )
        except SfmFailed as exc:
            _emit({**label, "mapper": mapper, "skipped": True, "reason": exc.message[:300]})
            continue
        record: dict[str, Any] = {
            **label,
            "mapper": mapper,
            "used": result.mapper.get("used"),
            "fallback": result.mapper.get("fallback"),
            "fallback_reason": result.mapper.get("reason"),
            "wall_s": round(time.perf_counter() - t0, 2),
            "map_s": round(result.timings_ms["map"] / 1000, 2),
            "extract_match_s": round(
                (result.timings_ms["extract"] + result.timings_ms["match"]) / 1000, 2
            ),
            "registered": result.num_registered,
            "total": result.total_images,
            "points": result.num_points,
            "reproj_px": round(result.mean_reprojection_error, 4),
        }
        if truth is not None:
            poses, radius = truth
            views = [int(Path(n).stem.split("_")[1]) for n in result.registered_names]
            errors = pose_errors(
                [im.rotation for im in result.images],
                np.array([im.center for im in result.images]),
                [poses[v][0] for v in views],
                np.array([-poses[v][0].T @ poses[v][1] for v in views]),
            )
            record["centre_rms_rel_radius"] = round(errors["centre_rms"] / radius, 5)
            record["rotation_rms_deg"] = round(errors["rotation_rms_deg"], 3)
        _emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--views", type=int, nargs="*", default=[32, 120])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--features", choices=list(FEATURE_LEVELS), default="medium")
    parser.add_argument("--clips", nargs="*", default=sorted(glob.glob("/work/shared/media/*.mp4")))
    parser.add_argument("--clip-fps", type=float, default=2.0)
    parser.add_argument("--clip-max-side", type=int, default=640)
    parser.add_argument("--clip-max-frames", type=int, default=60)
    args = parser.parse_args()

    import pycolmap

    _emit({"bench": "mapper", "pycolmap": pycolmap.__version__, "cuda": bool(pycolmap.has_cuda),
           "threads": args.threads, "features": args.features})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-mapper-") as tmp:
        root = Path(tmp)
        for n in args.views:
            images, _k, poses, scene = render_views(n, seed=0)
            folder = root / f"orbit-{n}" / "images"
            folder.mkdir(parents=True)
            for i, view in enumerate(images):
                cv2.imwrite(str(folder / f"frame_{i:05d}.png"), view)
            _compare({"scene": "orbit", "views": n}, folder, folder.parent, args,
                     (poses, scene.radius))  # fmt: skip
        for clip in args.clips:
            folder = root / Path(clip).stem / "images"
            frames = iter_sharp_frames(
                Path(clip).read_bytes(),
                fps=args.clip_fps,
                max_side=args.clip_max_side,
                max_frames=args.clip_max_frames,
            )
            names = write_frames(frames, folder)
            label = {"scene": Path(clip).name, "frames": len(names), "fps": args.clip_fps}
            _compare(label, folder, folder.parent, args, None)


if __name__ == "__main__":
    main()
