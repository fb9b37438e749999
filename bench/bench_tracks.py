"""Benchmark of the point-tracking stage on the rendered Orbit clip; prints JSON lines.

    python bench/bench_tracks.py [--frames 48] [--repeats 3] [--large 640x480] [--no-large]

Clips: tests/orbit_scene.py, the subject crossing the frame (``follow=False``) and walking with
the camera (``follow=True``) at 320x240, and one crossing clip at the large size (focal scaled
with the width). Per clip one line: the render time; then per clip one line with the tracker's
accuracy against the truth (tests/test_tracks.py's ``accuracy``: share of samples within 2 px
where tracker and truth both see the point, per group; share of truly occluded samples the
tracker flags; share of truly visible samples it keeps), the gate's counts and score, and
speed: ``track_clip`` seconds (best of ``--repeats``) and tracked point-frames per second
(visible samples / seconds), plus ``filter_tracks`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.stages.tracks import filter_tracks, track_clip, track_quality  # noqa: E402
from tests.orbit_scene import orbit_clip  # noqa: E402
from tests.test_tracks import accuracy  # noqa: E402


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def bench_clip(name: str, frames: int, width: int, height: int, follow: bool, repeats: int) -> None:
    started = time.perf_counter()
    clip = orbit_clip(
        frames,
        width=width,
        height=height,
        focal=260.0 * width / 320,
        follow=follow,
        with_background=False,
    )
    emit(
        {
            "bench": "tracks_render",
            "clip": name,
            "size": f"{width}x{height}",
            "frames": frames,
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        tracks = track_clip(clip.frames, clip.masks)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    keep = filter_tracks(tracks)
    filter_s = time.perf_counter() - started
    numbers = accuracy(clip, tracks)
    quality = track_quality(tracks, keep)
    samples = int(tracks.visible.sum())
    best = min(times)
    emit(
        {
            "bench": "tracks",
            "clip": name,
            "size": f"{width}x{height}",
            "frames": frames,
            "tracker": "lucas-kanade",
            "tracks": len(tracks),
            "subject_within_2px": round(numbers["subject_within_2px"], 4),
            "background_within_2px": round(numbers["background_within_2px"], 4),
            "subject_occlusion_flagged": round(numbers["subject_occlusion_flagged"], 4),
            "background_occlusion_flagged": round(numbers["background_occlusion_flagged"], 4),
            "hidden_by_subject_samples": numbers["background_hidden_by_subject"],
            "hidden_by_subject_flagged": round(numbers["hidden_flagged"], 4),
            "subject_recall": round(numbers["subject_recall"], 4),
            "background_recall": round(numbers["background_recall"], 4),
            "kept": quality["num_tracks_kept"],
            "score": round(quality["score"], 4),
            "track_s": round(best, 3),
            "point_frames_per_s": round(samples / best),
            "filter_s": round(filter_s, 3),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", default="640x480")
    parser.add_argument("--no-large", action="store_true")
    args = parser.parse_args()
    bench_clip("crossing", args.frames, 320, 240, False, args.repeats)
    bench_clip("following", args.frames, 320, 240, True, args.repeats)
    if not args.no_large:
        width, height = (int(v) for v in args.large.split("x"))
        bench_clip("crossing", args.frames, width, height, False, args.repeats)


if __name__ == "__main__":
    main()
