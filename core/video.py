"""Video for tasks: the sampling options every video task shares, and the frames of a job's clip.

A clip is either a video file (`video`, or the Studio's `payloadBase64` with a video type),
decoded and sampled with PyAV, or a list of images (the Orbit app's `frames` with its `fps`).
Frames are yielded one at a time so a long clip is never held in memory by this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.control import cancel_requested
from core.errors import Cancelled, InvalidInput
from core.media import (
    FrameWindow,
    VideoFrame,
    fit_longest_side,
    iter_video_frames,
    probe_video,
)
from core.schemas import VideoOptions

if TYPE_CHECKING:
    from core.contract import JobContext, TaskRequest

DEFAULT_FRAMES_FPS = 30.0


@dataclass(frozen=True)
class ClipInfo:
    width: int
    height: int
    fps: float
    """The source's frame rate (the Orbit shape's `fps`)."""
    duration_s: float
    frame_count: int
    source: str
    """`video` (a decoded file) or `frames` (a list of images)."""
    rotation: int = 0
    """Degrees clockwise a video's frames were turned to display them (its display matrix);
    sizes, frames and coordinates are all upright."""

    def describe(self, options: VideoOptions, sampled: int) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "fps": round(self.fps, 3),
            "duration_s": round(self.duration_s, 3),
            "frame_count": self.frame_count,
            "sampled_frames": sampled,
            "sample_fps": options.fps,
            "start_sec": options.start_sec,
            "end_sec": options.end_sec,
            "source": self.source,
            "rotation": self.rotation,
        }


def is_clip(request: TaskRequest) -> bool:
    return request.video is not None or request.frames is not None


def clip_info(request: TaskRequest) -> ClipInfo:
    if request.frames is not None:  # the size from the headers: nothing is decoded here
        fps = request.frames_fps or DEFAULT_FRAMES_FPS
        frames = request.frames
        count = len(frames)
        return ClipInfo(frames.width, frames.height, fps, count / fps, count, "frames")
    assert request.video is not None
    info = probe_video(request.video.data)
    return ClipInfo(
        info.width,
        info.height,
        info.fps,
        info.duration_s,
        info.frame_count,
        "video",
        info.rotation,
    )


def iter_clip_frames(
    request: TaskRequest,
    options: VideoOptions,
    *,
    max_side: int | None = None,
    warnings: list[str] | None = None,
) -> Iterator[VideoFrame]:
    """The sampled frames in order; `invalid_input` when the window holds none. Stops with
    `cancelled` when the local endpoint server cancels the job, so video tasks stop between
    frames. With `warnings`, a file whose frames end well before its stated duration (a cut or
    damaged upload) adds a warning instead of passing for a shorter clip."""
    emitted = 0
    last_time = 0.0
    for frame in _frames(request, options, max_side):
        if cancel_requested():  # the local endpoint server cancelled the job or it timed out
            raise Cancelled("the job was cancelled (or ran past its execution timeout)")
        emitted += 1
        last_time = frame.time_s
        yield frame
    if emitted == 0:
        window = f"[{options.start_sec}, {options.end_sec if options.end_sec else 'end'})"
        info = clip_info(request)
        raise InvalidInput(
            f"no frames in the window {window} s: the clip is {info.duration_s:.2f} s long "
            f"({info.frame_count} frames); check start_sec and end_sec"
        )
    if warnings is not None and request.frames is None and emitted < options.max_frames:
        note = _missing_end(request, options, last_time)
        if note:
            warnings.append(note)


def _missing_end(request: TaskRequest, options: VideoOptions, last_time: float) -> str | None:
    info = clip_info(request)
    if info.duration_s <= 0:  # no stated duration (some live recordings): nothing to compare
        return None
    window_end = min(options.end_sec or info.duration_s, info.duration_s)
    step = 1.0 / options.fps if options.fps else 1.0 / info.fps
    if window_end - last_time <= step + max(0.5, 0.05 * info.duration_s):
        return None
    return (
        f"video: the frames end at {last_time:.2f} s but the file says {info.duration_s:.2f} s; "
        "it may be cut short or damaged, and the frames after that are missing"
    )


def _frames(
    request: TaskRequest, options: VideoOptions, max_side: int | None
) -> Iterator[VideoFrame]:
    if request.frames is None:
        assert request.video is not None
        yield from iter_video_frames(
            request.video.data,
            fps=options.fps,
            start_sec=options.start_sec,
            end_sec=options.end_sec,
            max_frames=options.max_frames,
            max_side=max_side,
        )
        return
    rate = request.frames_fps or DEFAULT_FRAMES_FPS
    window = FrameWindow(options.fps, options.start_sec, options.end_sec, options.max_frames)
    frames = request.frames
    timed = ((index / rate, index) for index in range(len(frames)))
    for time_s, index in window.select(timed):  # only the frames kept are decoded
        pixels = fit_longest_side(frames[index].pixels, max_side)
        yield VideoFrame(index=index, time_s=time_s, pixels=pixels)


def frame_stamp(frame: VideoFrame) -> dict[str, Any]:
    """What every per-frame result starts with."""
    return {"frame_index": frame.index, "time_s": round(frame.time_s, 4)}


def per_frame_output(
    ctx: JobContext, frames: list[dict[str, Any]], name: str = "frames.json"
) -> dict[str, Any]:
    """`{"frames": [...]}` inline, or, for a long clip, the same list as a JSON artifact
    (S3, OUTPUT_DIR or inline base64 under its budget) so the result stays small."""
    encoded = json.dumps(frames, separators=(",", ":")).encode()
    if len(encoded) <= ctx.settings.frames_inline_max_bytes:
        return {"frames": frames}
    with ctx.timings.measure("upload"):
        artifact = ctx.store.put(name, encoded, "application/json")
    return {"frames_artifact": artifact, "frames_count": len(frames)}
