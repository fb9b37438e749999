"""velocity-estimation: speed of tracked objects in m/s, from YOLO tracking plus dense
optical flow between consecutive sampled frames (torchvision's RAFT small or large, or OpenCV
DIS). Two models: `model` is the detector (a YOLO checkpoint), `options.flow_model` the flow.

Method, per consecutive pair of sampled frames (t, t+1) and per track present in frame t:

1. Flow is computed on both frames scaled so the long side is `imgsz` (never enlarged).
2. The track's box in frame t is shrunk to its centred core (`CORE_FRACTION` of its width and
   height) and the component-wise median of the flow inside it is the object's displacement
   (dx, dy), scaled back to source pixels. The core keeps background pixels out even for
   shapes that fill half their box (a triangle fills 87% of its box's core); the median
   ignores the rest and moving parts such as limbs and wheels.
3. With `subtract_background`, the median flow outside every box (the camera's own pan) is
   subtracted first.
4. speed = |(dx, dy)| * meter_per_pixel / dt, where dt is the true time between the two frames
   (their timestamps), not 1 / fps: sampling with `fps` or a variable frame rate stays right.

Why flow and not the displacement of box centres: a detector's box edges jitter by a pixel or
more from frame to frame, and the tracker's boxes are Kalman-smoothed (they lag a change of
speed), so at the slow speeds of people seen from afar the centre's displacement is mostly
noise; dense flow is sub-pixel, measured on the object's own texture, and independent of how
tight the box is. The tracker still decides which detections are one object over time.

A frame's speed is the one measured from it to the next sampled frame, so the last sampled
frame has none (`speed_mps: null`). `meter_per_pixel` is one scale for the whole frame: right
for a camera looking straight down or at objects at a known distance, approximate elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import closing
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from core.annotate import ClipAnnotator, sample_rate
from core.contract import JobContext, TaskRequest
from core.errors import InvalidInput, ModelUnavailable
from core.models import LoadedModel, worker_device
from core.schemas import YoloOptions
from core.tasks import Task, register
from core.tasks._flow import (
    RAFT_WEIGHTS,
    DisFlow,
    FlowBackend,
    RaftFlow,
    background_flow,
    core_region,
    load_raft,
    median_flow,
    raft_file,
    resize_to,
    working_size,
)
from core.tasks._yolo import (
    class_names,
    load_yolo,
    preload_yolo,
    summarise_tracks,
    to_detections,
    track_clip,
)
from core.video import clip_info, frame_stamp, per_frame_output

CORE_FRACTION = 0.5
"""Share of a box's width and height (centred) whose flow counts as the object's motion."""
RAFT_ITERATIONS = 12  # torchvision's default number of refinement steps


class VelocityOptions(YoloOptions):
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="confidence threshold")
    max_frames: int = Field(default=121, ge=2, le=10_000)
    max_pairs: int = Field(
        default=120, ge=1, le=10_000, description="at most this many frame pairs get flow"
    )
    meter_per_pixel: float = Field(
        default=0.05, gt=0, le=1000, description="metres per source pixel, one scale per frame"
    )
    flow: Literal["raft", "dis"] = Field(
        default="raft",
        description="raft: torchvision RAFT (flow_model); dis: OpenCV DIS, no weights",
    )
    flow_model: str = Field(
        default=RAFT_WEIGHTS,
        min_length=1,
        max_length=64,
        description="RAFT's weights: raft_small.pth or raft_large.pth (or raft-small, raft-large); "
        "`model` names the detector",
    )
    subtract_background: bool = Field(
        default=False, description="subtract the median flow outside all boxes (camera pan)"
    )
    track: Literal[True] = Field(default=True, description="velocity always tracks")

    @field_validator("flow", mode="before")
    @classmethod
    def _lower_flow(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    options = request.options_as(VelocityOptions)
    assert request.model is not None
    with ctx.timings.measure("load_model"):
        backend = flow_backend(options, ctx)  # first: a missing RAFT fails before any decoding
        detector = load_yolo(request.model, "detect")

    # max_pairs pairs need max_pairs + 1 frames; sample no more than that.
    frame_limit = min(options.max_frames, options.max_pairs + 1)
    sampling = options.model_copy(update={"max_frames": frame_limit})
    clip_request = dataclasses.replace(request, options=sampling)
    info = clip_info(request)
    estimator = SpeedEstimator(options, backend, ctx)
    names = class_names(detector.model)

    frames: list[dict[str, Any]] = []
    # A frame's speeds are measured towards the next one: it is drawn one frame later.
    annotator = ClipAnnotator(ctx, request.annotate, sample_rate(info.fps, options.fps), lag=1)
    # closing(): if anything below raises, the generator ends now and frees the detector's
    # lock, which it holds for the whole clip, instead of whenever it is garbage collected.
    with annotator, closing(track_clip(detector, clip_request, ctx)) as tracked_frames:
        for frame, result in tracked_frames:
            with ctx.timings.measure("encode"):
                tracked = [
                    {
                        "track_id": d.track_id,
                        "label": d.label,
                        "class_id": d.class_id,
                        "confidence": d.confidence,
                        "box": d.box,
                        "speed_mps": None,
                        "velocity_mps": None,
                    }
                    for d in to_detections(result, names)
                    if d.track_id is not None
                ]
            estimator.add(frame.time_s, frame.pixels, tracked)
            frames.append({**frame_stamp(frame), "tracks": tracked})
            annotator.add(frame.pixels, frame.time_s, tracked)
            ctx.progress.update(
                "velocity", 100 * len(frames) / frame_limit, f"frame {len(frames)} of {frame_limit}"
            )

    if len(frames) < 2:
        raise InvalidInput(
            f"velocity needs at least 2 sampled frames; the window gave {len(frames)}: widen "
            "start_sec/end_sec or raise fps"
        )
    if frame_limit < options.max_frames and len(frames) == frame_limit:
        ctx.warnings.append(
            f"max_pairs={options.max_pairs} caps the clip at {frame_limit} sampled frames"
        )
    tracks = track_speeds(frames)
    if not tracks:
        ctx.warnings.append(
            f"no object was tracked at threshold {options.threshold}; nothing to measure"
        )
    output: dict[str, Any] = {
        "video": info.describe(sampling, len(frames)),
        "tracker": f"{options.tracker}.yaml",
        "flow": {
            "backend": backend.name,
            "model": raft_file(options.flow_model) if backend.name == "raft" else None,
            "working_size": list(estimator.size or ()),
            "pairs": len(frames) - 1,
        },
        "method": (
            f"median optical flow in the central {CORE_FRACTION:.0%} of each box (width and "
            "height) from a frame to the next sampled one, times meter_per_pixel, over the "
            "true time between them"
        ),
        "meter_per_pixel": options.meter_per_pixel,
        "camera_motion": "subtracted" if options.subtract_background else "not subtracted",
        "speed_unit": "m/s",
        "tracks": tracks,
    }
    output.update(per_frame_output(ctx, frames))
    output.update(annotator.output())
    return output


def flow_backend(options: VelocityOptions, ctx: JobContext) -> FlowBackend:
    if options.flow == "dis":
        return DisFlow()
    try:
        loaded = load_raft(options.flow_model)
    except ModelUnavailable as exc:
        raise ModelUnavailable(
            f'{exc.message}; or send options.flow: "dis" (OpenCV DIS, which needs no weights)',
            **exc.details,
        ) from exc
    return RaftFlow(loaded, ctx.device, RAFT_ITERATIONS)


class SpeedEstimator:
    """Fed the sampled frames in order; fills each frame's tracked entries with the speed
    measured from that frame to the next. Holds only the previous frame (at working size)."""

    def __init__(self, options: VelocityOptions, backend: FlowBackend, ctx: JobContext) -> None:
        self.options = options
        self.backend = backend
        self.ctx = ctx
        self.size: tuple[int, int] | None = None
        """Flow's (w, h): the first frame's, scaled so its long side is at most imgsz."""
        self._previous: tuple[float, np.ndarray, list[dict[str, Any]]] | None = None
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.ctx.warnings.append(message)

    def add(self, time_s: float, pixels: np.ndarray, tracked: list[dict[str, Any]]) -> None:
        source_h, source_w = pixels.shape[:2]
        if self.size is None:
            self.size = working_size(source_w, source_h, self.options.imgsz)
        width, height = self.size
        small = resize_to(pixels, (width, height))
        previous, self._previous = self._previous, (time_s, small, tracked)
        if previous is None:
            return
        before_time, before, entries = previous
        if not entries:
            return  # nothing to measure: skip the flow
        dt = time_s - before_time
        if dt <= 0:
            self._warn_once("dt", "two sampled frames share a timestamp; their speed is null")
            return
        with self.ctx.timings.measure("flow"):
            flow = self.backend(before, small)
        # Working pixels per source pixel, per axis (rounding makes them differ slightly).
        scale_x, scale_y = width / source_w, height / source_h
        boxes = [
            (b[0] * scale_x, b[1] * scale_y, b[2] * scale_x, b[3] * scale_y)
            for b in (entry["box"] for entry in entries)
        ]
        camera = (0.0, 0.0)
        if self.options.subtract_background:
            found = background_flow(flow, boxes)
            if found is None:
                self._warn_once(
                    "background",
                    "boxes cover over 95% of a frame: camera motion not subtracted there",
                )
            else:
                camera = found
        mpp = self.options.meter_per_pixel
        for entry, box in zip(entries, boxes, strict=True):
            region = core_region(box, width, height, CORE_FRACTION)
            dx, dy = median_flow(flow, region)
            # Back to source pixels, then metres per second.
            vx = (dx - camera[0]) / scale_x * mpp / dt
            vy = (dy - camera[1]) / scale_y * mpp / dt
            if not (math.isfinite(vx) and math.isfinite(vy)):
                self._warn_once("nan", "optical flow was not finite for some boxes; speed null")
                continue
            entry["velocity_mps"] = [round(vx, 4), round(vy, 4)]
            entry["speed_mps"] = round(math.hypot(vx, vy), 4)
            entry["_dt"] = dt


def track_speeds(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per track: `summarise_tracks`' entry plus its speeds over time and their summary."""
    samples: dict[int, list[dict[str, Any]]] = {}
    for frame in frames:
        for entry in frame["tracks"]:
            dt = entry.pop("_dt", None)
            if entry["speed_mps"] is None:
                continue
            samples.setdefault(entry["track_id"], []).append(
                {
                    "frame_index": frame["frame_index"],
                    "time_s": frame["time_s"],
                    "dt_s": round(dt, 6),
                    "speed_mps": entry["speed_mps"],
                    "velocity_mps": entry["velocity_mps"],
                }
            )
    summary = summarise_tracks(
        [{**frame, "detections": frame["tracks"]} for frame in frames]  # same fields it reads
    )
    for track in summary:
        speeds = samples.get(track["track_id"], [])
        values = np.array([s["speed_mps"] for s in speeds], float)
        track["speeds"] = speeds
        if values.size:
            track["mean_speed_mps"] = round(float(values.mean()), 4)
            track["median_speed_mps"] = round(float(np.median(values)), 4)
            track["max_speed_mps"] = round(float(values.max()), 4)
            track["distance_m"] = round(sum(s["speed_mps"] * s["dt_s"] for s in speeds), 4)
        else:  # seen only in the last frame, or never with a usable flow
            track["mean_speed_mps"] = track["median_speed_mps"] = None
            track["max_speed_mps"] = track["distance_m"] = None
    return summary


def load(name: str) -> LoadedModel:
    """PRELOAD_MODELS: the detector (pinned, warmed up) and RAFT (pinned, warmed up)."""
    loaded = preload_yolo(name, "detect")
    raft = RaftFlow(load_raft(pin=True), worker_device(), iterations=1)
    side = raft.minimum
    raft(np.zeros((side, side, 3), np.uint8), np.zeros((side, side, 3), np.uint8))
    return loaded


TASK = register(
    Task(
        name="velocity-estimation",
        options=VelocityOptions,
        run=run,
        media=frozenset({"video"}),
        default_model="yolo11n.pt",
        load=load,
        description="speed in m/s per tracked object over time (YOLO tracking + optical flow)",
    )
)
