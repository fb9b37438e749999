"""ingest: a plate's frames as a PNG sequence (`frame_%04d.png`, from 1, as the seed's ffmpeg
call names them), with a manifest tying each file to its source frame number and time.

Decoding and sampling are the shared ones (`core/media.iter_video_frames` through
`core/video.iter_clip_frames`): the caller hands the frames over; this stage writes them and
the manifest, and loads them back for later stages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.control import cancel_requested
from core.errors import Cancelled, InvalidInput
from core.media import VideoFrame
from core.stages.project import FRAME_PATTERN, FRAMES_DIR, MANIFEST, Project

Progress = Callable[[float, str], None]
CANCELLED = "the job was cancelled (or ran past its execution timeout)"
PROGRESS_EVERY = 5


@dataclass(frozen=True)
class IngestedFrame:
    number: int
    """The file's number (`frame_0001.png` is 1)."""
    source_frame: int
    """The frame's index in the plate (presentation order, from 0)."""
    time_s: float

    @property
    def file(self) -> str:
        return FRAME_PATTERN % self.number

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "frame": self.number,
            "source_frame": self.source_frame,
            "time_s": round(self.time_s, 6),
        }


@dataclass
class Ingested:
    width: int
    height: int
    fps: float
    """The rate the sequence was sampled at (the plate's own when every frame was kept)."""
    source_fps: float
    frames: list[IngestedFrame] = field(default_factory=list)

    @property
    def frame_count(self) -> int:
        return len(self.frames)

    def manifest(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "fps": round(self.fps, 6),
            "source_fps": round(self.source_fps, 6),
            "frame_count": self.frame_count,
            "pattern": FRAME_PATTERN,
            "frames": [frame.as_dict() for frame in self.frames],
        }


def ingest_frames(
    frames: Iterable[VideoFrame],
    project: Project,
    *,
    fps: float | None,
    source_fps: float,
    expected: int | None = None,
    progress: Progress | None = None,
) -> Ingested:
    """Write every frame as `source/frames/frame_%04d.png` and the manifest, replacing what an
    earlier ingest left; cancellable between frames."""
    folder = project.folder(FRAMES_DIR, empty=True)
    ingested: Ingested | None = None
    for frame in frames:
        if cancel_requested():
            raise Cancelled(CANCELLED)
        height, width = frame.pixels.shape[:2]
        if ingested is None:
            ingested = Ingested(width, height, fps or source_fps, source_fps)
        number = ingested.frame_count + 1
        record = IngestedFrame(number, frame.index, frame.time_s)
        if not cv2.imwrite(str(folder / record.file), frame.pixels):
            raise OSError(f"could not write {record.file}")
        ingested.frames.append(record)
        if progress is not None and number % PROGRESS_EVERY == 0:
            share = number / expected if expected else 0.5
            progress(min(share, 0.99), f"frame {number} (source {frame.index})")
    if ingested is None:
        raise InvalidInput("ingest: the plate gave no frames")
    project.path(MANIFEST).write_text(json.dumps(ingested.manifest(), indent=1))
    project.publish(FRAMES_DIR)
    project.publish(MANIFEST)
    if progress is not None:
        progress(1.0, f"{ingested.frame_count} frames")
    return ingested


def read_manifest(project: Project) -> Ingested:
    """The kept sequence's manifest; `invalid_input` when the project has no frames."""
    data = project.manifest()
    if data is None or not project.frame_files():
        raise InvalidInput(
            f"project {project.name!r} has no ingested frames: run the ingest stage first "
            "(send `video`, or upload a plate)"
        )
    ingested = Ingested(
        int(data["width"]), int(data["height"]), float(data["fps"]), float(data["source_fps"])
    )
    for item in data["frames"]:
        ingested.frames.append(
            IngestedFrame(int(item["frame"]), int(item["source_frame"]), float(item["time_s"]))
        )
    return ingested


def load_frames(project: Project, ingested: Ingested) -> list[np.ndarray]:
    """The kept frames (BGR uint8), in order; cancellable between frames."""
    folder = project.root / FRAMES_DIR
    frames = []
    for record in ingested.frames:
        if cancel_requested():
            raise Cancelled(CANCELLED)
        pixels = cv2.imread(str(folder / record.file), cv2.IMREAD_COLOR)
        if pixels is None:
            raise InvalidInput(f"project {project.name!r}: {record.file} is missing or unreadable")
        frames.append(pixels)
    return frames


def numbered(folder: Path, stem: str, number: int, suffix: str = ".png") -> Path:
    """`folder/<stem>_%04d<suffix>`: every per-frame output is numbered like its frame."""
    return folder / f"{stem}_{number:04d}{suffix}"
