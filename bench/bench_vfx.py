"""Benchmark of the VFX stages on a real plate; prints JSON lines.

    python bench/bench_vfx.py [--plate ../shared/media/sam2_01_dog_walk.mp4] [--max-side 640]
                              [--fps 24] [--max-frames 240] [--colmap-stride 4]
                              [--qualities low medium high]

The plate (default: the 9.6 s 1280x720 dog walk from ../shared/media, resized to a 640 px
longest side, sampled at 24 fps as the seed ingests) goes through the stages one by one on a
project under a temporary OUTPUT_DIR: ingest; depth (Video Depth Anything's consistent depth
with a random-weight checkpoint of Depth Anything V2 Small's architecture: the time is the
real model's, the maps are not) when `core.stages.video_depth` is present; matte (guided
filter) and cleanplate on a synthetic subject mask (a moving ellipse: no roto model offline;
timing only); the camera solve at each SIFT quality (`low` / `medium` / `high` = 2048 / 8192 /
16384 features, sequential matching, one camera) on every `--colmap-stride`-th frame of the
plate, or (`--colmap-source orbit`) on a rendered orbit shot with a known camera
(tests/orbit_scene.py at the plate's size: a tripod plate has no parallax to solve), with the
registered frames and, on the orbit shot, the camera-centre error after a similarity
alignment. One line per stage: seconds, frames, frames per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import Settings
from core.media import iter_video_frames, probe_video
from core.stages.cleanplate import clean_plates
from core.stages.ingest import ingest_frames, load_frames
from core.stages.matte import matte_frames
from core.stages.project import Project

DEFAULT_PLATE = Path(__file__).resolve().parents[2] / "shared" / "media" / "sam2_01_dog_walk.mp4"


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def timed(stage: str, frames: int, started: float, **extra: Any) -> None:
    seconds = time.perf_counter() - started
    emit(
        {
            "bench": "vfx",
            "stage": stage,
            "frames": frames,
            "seconds": round(seconds, 2),
            "fps": round(frames / seconds, 2) if seconds > 0 else None,
            **extra,
        }
    )


def ellipse_masks(count: int, height: int, width: int) -> list[np.ndarray]:
    """A subject-sized ellipse crossing the frame (timing only; no roto model offline)."""
    yy, xx = np.mgrid[0:height, 0:width]
    masks = []
    for i in range(count):
        cx = width * (0.3 + 0.4 * i / max(1, count - 1))
        masks.append(
            ((xx - cx) / (0.12 * width)) ** 2 + ((yy - 0.6 * height) / (0.3 * height)) ** 2 < 1
        )
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plate", type=Path, default=DEFAULT_PLATE)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--max-frames", type=int, default=240)
    parser.add_argument("--colmap-stride", type=int, default=4)
    parser.add_argument("--qualities", nargs="+", default=["low", "medium", "high"])
    parser.add_argument("--skip-depth", action="store_true")
    parser.add_argument("--skip-stages", action="store_true", help="only the camera solves")
    parser.add_argument("--colmap-source", choices=["plate", "orbit"], default="orbit")
    parser.add_argument("--orbit-frames", type=int, default=48)
    args = parser.parse_args()
    if not args.plate.is_file():
        sys.exit(f"{args.plate}: no such plate (real footage lives in ../shared/media)")

    work = Path(tempfile.mkdtemp(prefix="bench-vfx-"))
    project = Project("BenchShot", Settings(output_dir=work / "out", work_dir=work), None)
    info = probe_video(args.plate)
    emit({"bench": "vfx", "plate": args.plate.name, "size": [info.width, info.height],
          "source_fps": round(info.fps, 3), "duration_s": round(info.duration_s, 2)})  # fmt: skip

    started = time.perf_counter()
    frames_iter = iter_video_frames(
        args.plate, fps=args.fps, max_frames=args.max_frames, max_side=args.max_side
    )
    ingested = ingest_frames(frames_iter, project, fps=args.fps, source_fps=info.fps)
    timed("ingest", ingested.frame_count, started, size=[ingested.width, ingested.height])
    frames = load_frames(project, ingested)
    numbers = [f.number for f in ingested.frames]

    if not (args.skip_depth or args.skip_stages):
        try:
            from core.encode import depth_to_png16
            from core.stages.video_depth import consistent_depth
        except ImportError:
            emit({"bench": "vfx", "stage": "depth", "skipped": "core.stages.video_depth absent"})
        else:
            import os

            import core.models
            from core.config import get_settings
            from core.tasks.depth import load_depth
            from scripts.make_test_weights_depth import make_depth_checkpoint

            make_depth_checkpoint(work / "weights")
            os.environ.update(WEIGHTS_DIR=str(work / "weights"), ALLOW_MODEL_DOWNLOADS="false")
            get_settings.cache_clear()
            core.models._registry = None
            loaded = load_depth("depth-anything-v2-small")
            started = time.perf_counter()
            depth = consistent_depth(loaded, frames)
            folder = project.folder("depth", empty=True)
            for number, disparity in zip(numbers, depth.depths, strict=True):
                (folder / f"depth_{number:04d}.png").write_bytes(
                    depth_to_png16(disparity, depth.lo, depth.hi)
                )
            timed("depth", len(depth.depths), started, weights="random (real architecture)")

    if not args.skip_stages:
        other_stages(frames, numbers, ingested.height, ingested.width, project)
    solves(args, frames, work)


def other_stages(
    frames: list[np.ndarray], numbers: list[int], height: int, width: int, project: Project
) -> None:
    masks = ellipse_masks(len(frames), height, width)
    started = time.perf_counter()
    result = matte_frames(
        frames, masks, project.folder("matte", empty=True), numbers, method="guided_filter"
    )
    timed("matte", len(result.files), started, method=result.method, masks="synthetic ellipse")

    started = time.perf_counter()
    plates = clean_plates(frames, masks, project.folder("cleanplate", empty=True), numbers)
    timed(
        "cleanplate",
        len(plates.files),
        started,
        filled_share=plates.shares(),
        masks="synthetic ellipse",
    )


def solves(args: argparse.Namespace, frames: list[np.ndarray], work: Path) -> None:
    truth: np.ndarray | None = None
    path_length = 0.0
    if args.colmap_source == "orbit":
        from tests.orbit_scene import orbit_clip

        height, width = frames[0].shape[:2]
        started = time.perf_counter()
        shot = orbit_clip(args.orbit_frames, width=width, height=height, focal=0.8 * width,
                          follow=True, with_background=False)  # fmt: skip
        emit({"bench": "vfx", "step": "render_orbit", "frames": len(shot.frames),
              "seconds": round(time.perf_counter() - started, 2)})  # fmt: skip
        subset, masks, truth, path_length = shot.frames, shot.masks, shot.centres, shot.path_length
    else:
        subset, masks = frames[:: args.colmap_stride], None
    try:
        from core.stages.camera import QUALITY_FEATURES, solve_camera
    except ImportError:
        emit({"bench": "vfx", "stage": "colmap", "skipped": "core.stages.camera absent"})
        return
    from core.errors import SfmFailed

    for quality in args.qualities:
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(dir=work) as solve_dir:
                solve = solve_camera(
                    subset, masks, Path(solve_dir), quality=quality, matching="sequential"
                )
            registered = sum(p.registered for p in solve.poses)
            accuracy: dict[str, float] = {}
            if truth is not None:
                from tests.splat_scene import umeyama

                kept = [(p.frame, p.camera_to_world) for p in solve.poses if p.registered]
                centres = np.array([m[:3, 3] for _, m in kept if m is not None])
                known = truth[[f for f, m in kept if m is not None]]
                scale, rot, shift = umeyama(centres, known)
                aligned = (scale * (rot @ centres.T)).T + shift
                rms = float(np.sqrt(((aligned - known) ** 2).sum(axis=1).mean()))
                accuracy = {"centre_rms_share_of_path": round(rms / path_length, 5)}
            timed(
                "colmap", len(subset), started, quality=quality,
                max_features=QUALITY_FEATURES[quality], registered=registered,
                median_reprojection_error=round(float(solve.median_reprojection_error()), 3),
                source=args.colmap_source, **accuracy,
            )  # fmt: skip
        except SfmFailed as exc:
            timed(
                "colmap", len(subset), started, quality=quality, source=args.colmap_source,
                failed=exc.message[:200],
            )  # fmt: skip


if __name__ == "__main__":
    main()
