"""Orbit: one creator clip to a bounded-parallax orbit preview, in five stages on one worker.

Where each part of the contract comes from (Orbit's public source, read as the seed says):

* the request (`frames` as base64 images, `width`, `height`, `fps`, `prompt_points`; or
  `video_id` / `video_url` with `max_frames` 150 and `target_fps` 10) and the six routes:
  the seed document and its Modal backend `main.py` ("Orbit Backend - Modal GPU Services");
* the stage names (`segmentation`, `pose-estimation`, `depth-estimation`, `tracking`,
  `quality-check`, in that order) and the status fields: that backend's orchestrator;
* the metric names in `quality` (`inlier_ratio`, `edge_jitter`, `num_tracks_kept`, ...) and
  the result (`mode`, `bounds`, `quality`, `assets {masks, poses, depth, tracks}`): the same;
* the gates' thresholds, the bounds and the mode decision tree: its engineering PRD
  ("Project Multi-Cam v1"), sections 2 (bounds), B (gates) and E (fallbacks), with the
  reduced bounds of the fallback modes from the backend's decision engine.

The stages are app-agnostic pieces in `core/stages/`; this module composes them, maps their
metrics onto the gates and shapes the result and the routes.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.apps.base import App, JobGateway, JobView, without
from core.config import get_settings
from core.contract import JobContext, RequestAdapter, TaskRequest
from core.errors import InvalidInput, SfmFailed
from core.naming import safe_name_error
from core.progress import StagedProgress
from core.schemas import StrictModel

ORBIT_FIELDS = (
    "prompt_points",
    "prompt_frame",
    "width",
    "height",
    "video_id",
    "video_url",
    "max_frames",
    "target_fps",
    "orbit",
)
STAGES = ("segmentation", "pose-estimation", "depth-estimation", "tracking", "quality-check")
# Each stage's span of the job's 0-100, so the job's progress runs through them once. Roughly
# the shares bench/bench_orbit.py measured for a 10 s 640 px clip on a CPU (SAM 2 75 %, depth
# 19 %, the solve 2-7 %, tracks 0.2 %), leaning towards the solve, which a GPU does not speed.
SPANS: dict[str, tuple[float, float]] = {
    "segmentation": (0.0, 55.0),
    "pose-estimation": (55.0, 72.0),
    "depth-estimation": (72.0, 94.0),
    "tracking": (94.0, 98.0),
    "quality-check": (98.0, 100.0),
}
MESSAGES = {
    "segmentation": "Running SAM2 segmentation...",
    "pose-estimation": "Running COLMAP pose estimation (subject masked out)...",
    "depth-estimation": "Estimating consistent video depth...",
    "tracking": "Tracking points on the subject and the background...",
    "quality-check": "Evaluating quality gates...",
}
Mode = Literal["full-orbit", "micro-parallax", "2.5d-subject", "render-only"]
# PRD section 2 (Full Orbit) and the backend's decision engine (the reduced modes).
BOUNDS: dict[str, dict[str, float]] = {
    "full-orbit": {"maxYaw": 20, "maxPitch": 10, "maxRoll": 3, "maxTranslation": 0.10},
    "micro-parallax": {"maxYaw": 8, "maxPitch": 4, "maxRoll": 1, "maxTranslation": 0.03},
    "2.5d-subject": {"maxYaw": 15, "maxPitch": 8, "maxRoll": 2, "maxTranslation": 0.05},
    "render-only": {"maxYaw": 0, "maxPitch": 0, "maxRoll": 0, "maxTranslation": 0.0},
}
TRANSLATION_DEPTH_SHARE = 0.02
"""PRD 2: translation <= min(0.10 m, 2 % of the median scene depth)."""
ALLOWED_VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".avi", ".mkv")
MAX_VIDEO_BYTES = 500 * 1024 * 1024  # the backend's upload cap


class OrbitSettings(BaseSettings):
    """The app's own settings (`ORBIT_*`): which models its stages use."""

    model_config = SettingsConfigDict(env_prefix="ORBIT_", extra="ignore")

    sam2_model: str = "sam2_hiera_large.pt"
    """Orbit's backend ran `sam2_hiera_large`; a request's `model` overrides it."""
    depth_model: str = "depth-anything-v2-small"
    max_side: int = Field(default=1024, ge=64, le=4096)
    """Frames are processed at most this long (masks come at the clip's own size)."""


class OrbitOptions(StrictModel):
    """Our knobs on Orbit's job, under `orbit` (Orbit itself sends none)."""

    sfm_features: int = Field(default=4096, ge=256, le=32768)
    subject_points: int = Field(default=200, ge=0, le=5000)
    background_points: int = Field(default=300, ge=0, le=5000)
    depth_model: str | None = None
    depth_input_size: int | None = Field(default=None, ge=14, le=2048)


class OrbitSubmit(StrictModel):
    """Orbit's submit body (its backend's `SubmitJobRequest`); `frames`, `video`, `fps`,
    `model` and `options` are ours as well."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    video_id: str | None = None
    video_url: str | None = None
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    max_frames: int = Field(default=150, ge=2, le=10_000)
    target_fps: float = Field(default=10.0, gt=0, le=240)
    prompt_points: list[dict[str, Any]] | None = None
    prompt_frame: int = Field(default=0, ge=0)
    orbit: OrbitOptions = Field(default_factory=OrbitOptions)

    @field_validator("video_id")
    @classmethod
    def _safe_video_id(cls, value: str | None) -> str | None:
        problem = None if value is None else safe_name_error(value)
        if problem:
            raise ValueError(problem)
        return value


def recognises(job_input: dict[str, Any]) -> bool:
    """Orbit sends no `task`, and clicks (`prompt_points`) or an upload/URL of its own."""
    if "task" in job_input:
        return False
    return "prompt_points" in job_input or "video_id" in job_input or "video_url" in job_input


def to_native(job_input: dict[str, Any]) -> dict[str, Any]:
    submit = OrbitSubmit.model_validate(job_input)  # a ValidationError names the field
    sources = [
        name
        for name in ("frames", "video", "video_id", "video_url")
        if job_input.get(name) is not None
    ]
    if len(sources) != 1:
        raise InvalidInput(
            "send the clip one way: frames (base64 images), video_id (from /upload_video), "
            f"video_url or video; got {', '.join(sources) or 'none'}"
        )
    if submit.prompt_points:
        prompts_from_clicks(submit.prompt_points)  # bad clicks fail before anything is decoded
    native = without(job_input, *ORBIT_FIELDS)
    if submit.video_id is not None:
        native["video"] = f"upload://{submit.video_id}"
    elif submit.video_url is not None:
        native["video"] = submit.video_url
    options = dict(native.get("options") or {})
    options.setdefault("max_frames", submit.max_frames)
    if "frames" not in job_input:  # a video is sampled at Orbit's rate; frames are all kept
        options.setdefault("fps", submit.target_fps)
    options.setdefault("max_side", OrbitSettings().max_side)
    native["options"] = options
    native.setdefault("model", OrbitSettings().sam2_model)
    return {**native, "task": "sam2-segmentation"}


def prompts_from_clicks(prompt_points: list[dict[str, Any]], frame_index: int = 0) -> list[Any]:
    """The app's clicks: `[{"x", "y"}, ...]`, all on the subject (a `label` of 0 marks a
    background click), on frame `frame_index` of the clip; one object, id 1."""
    from core.tasks._sam2_prompts import MAX_POINTS, make_prompt

    if not prompt_points:
        raise InvalidInput("prompt_points: give at least one {x, y} point on the subject")
    points, labels = [], []
    for index, item in enumerate(prompt_points):
        where = f"prompt_points.{index}"
        try:
            x, y = float(item["x"]), float(item["y"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{where}: must be an object with numbers x and y") from exc
        label = item.get("label", 1)
        if label not in (0, 1):
            raise InvalidInput(f"{where}.label: must be 1 (the subject) or 0 (background)")
        points.append((x, y))
        labels.append(int(label))
    if 1 not in labels:
        raise InvalidInput("prompt_points: at least one point must be on the subject")
    if len(points) > MAX_POINTS:
        raise InvalidInput(f"prompt_points: at most {MAX_POINTS} points")
    return [make_prompt(1, points, labels, None, 0, "prompt_points", points_field="prompt_points")]


# --------------------------------------------------------------------------------------------
# Quality gates and the mode (PRD B and E)


@dataclass(frozen=True)
class Decision:
    mode: Mode
    bounds: dict[str, Any]
    gate_results: dict[str, dict[str, Any]]
    reasons: list[str]


def pose_gate(pose: dict[str, Any], long_side: int) -> dict[str, Any]:
    """PRD B2: inlier ratio >= 0.35, median reprojection error <= 2.0 px (scaled by
    resolution: 2 px at 1080p-class frames and below, proportionally more above), >= 3
    quadrants populated in >= 60 % of frames, jitter <= 0.5. Hard failure (Render-Only): no
    solve, or under 30 % of the frames registered."""
    max_error = 2.0 * max(1.0, long_side / 1920)
    checks = {
        "inlier_ratio": _number(pose, "inlier_ratio", 0.0) >= 0.35,
        "median_reprojection_error": _number(pose, "median_reprojection_error", 999.0) <= max_error,
        "good_coverage_frame_percent": _number(pose, "good_coverage_frame_percent", 0.0) >= 0.6,
        "jitter_score": _number(pose, "jitter_score", 1.0) <= 0.5,
    }
    registered = _number(pose, "registered", 0.0) / max(1.0, _number(pose, "total", 1.0))
    hard = registered < 0.3
    return {
        "passed": all(checks.values()) and not hard,
        "hard_failure": hard,
        "checks": checks,
        "max_reprojection_error_px": max_error,
        "score": pose.get("score", 0.0),
    }


def _number(metrics: dict[str, Any], key: str, missing: float) -> float:
    """A metric, or the failing value when absent or not measurable (None)."""
    value = metrics.get(key)
    return missing if value is None else float(value)


def track_gate(track: dict[str, Any]) -> dict[str, Any]:
    """PRD B3 (tracks with confidence < 0.6, lifespan < 15 frames or a large residual
    against their neighbours are discarded upstream); too few kept -> 2.5D Subject. The
    backend's thresholds: >= 50 kept, median lifespan >= 15, median confidence >= 0.6."""
    checks = {
        "num_tracks_kept": _number(track, "num_tracks_kept", 0.0) >= 50,
        "median_lifespan": _number(track, "median_lifespan", 0.0) >= 15,
        "median_confidence": _number(track, "median_confidence", 0.0) >= 0.6,
    }
    return {"passed": all(checks.values()), "checks": checks}


def depth_gate(depth: dict[str, Any]) -> dict[str, Any]:
    """PRD B4 depth confidence; the backend's thresholds: temporal consistency >= 0.7 and
    edge stability >= 0.6."""
    checks = {
        "temporal_consistency": _number(depth, "temporal_consistency", 0.0) >= 0.7,
        "edge_stability": _number(depth, "edge_stability", 0.0) >= 0.6,
    }
    return {"passed": all(checks.values()), "checks": checks}


def mask_gate(mask: dict[str, Any]) -> dict[str, Any]:
    """PRD B1: a subject over 65 % of the frame in over 30 % of frames is a pose risk;
    severe jitter makes the subject layer a fallback candidate."""
    passed = _number(mask, "score", 0.0) >= 0.5 and not mask.get("severe_jitter", False)
    return {
        "passed": passed,
        "pose_risk": bool(mask.get("pose_risk", False)),
        "severe_jitter": bool(mask.get("severe_jitter", False)),
        "score": mask.get("score", 0.0),
    }


def decide(
    quality: dict[str, dict[str, Any]], long_side: int, median_depth: float | None
) -> Decision:
    """PRD E, in order: pose fails hard -> Render-Only; pose borderline -> Micro-Parallax;
    pose ok but the subject unstable (tracks, depth or masks) -> 2.5D Subject; else Full Orbit."""
    gates = {
        "segmentation": mask_gate(quality["mask"]),
        "pose": pose_gate(quality["pose"], long_side),
        "track": track_gate(quality["track"]),
        "depth": depth_gate(quality["depth"]),
    }
    reasons: list[str] = []
    if gates["segmentation"]["pose_risk"]:
        reasons.append("the subject covers over 65% of the frame in over 30% of frames")
    mode: Mode
    if gates["pose"]["hard_failure"]:
        mode = "render-only"
        reasons.append("the background-only camera solve failed")
    elif not gates["pose"]["passed"]:
        mode = "micro-parallax"
        failed = [k for k, ok in gates["pose"]["checks"].items() if not ok]
        reasons.append(f"pose gate borderline: {', '.join(failed)}")
    elif not (gates["track"]["passed"] and gates["depth"]["passed"]):
        mode = "2.5d-subject"
        for name in ("track", "depth"):
            failed = [k for k, ok in gates[name]["checks"].items() if not ok]
            if failed:
                reasons.append(f"{name} gate failed: {', '.join(failed)}")
    elif not gates["segmentation"]["passed"]:
        mode = "2.5d-subject"
        reasons.append("the subject's mask is unstable (jitter or leaks)")
    else:
        mode = "full-orbit"
        reasons.append("every gate passed")
    bounds: dict[str, Any] = dict(BOUNDS[mode])
    # Metres are unknown to a monocular solve: the cap in metres stays the PRD's, and the
    # depth rule is given in the solve's own units, for a viewer that clamps in scene units.
    bounds["maxTranslationDepthPercent"] = TRANSLATION_DEPTH_SHARE * 100
    bounds["clampToParallax"] = True
    if median_depth is not None and mode != "render-only":
        share = BOUNDS[mode]["maxTranslation"] / BOUNDS["full-orbit"]["maxTranslation"]
        bounds["maxTranslationSceneUnits"] = round(
            share * TRANSLATION_DEPTH_SHARE * median_depth, 6
        )
        bounds["medianSceneDepth"] = round(median_depth, 6)
    return Decision(mode, bounds, gates, reasons)


# --------------------------------------------------------------------------------------------
# The job


def run_orbit(job_input: dict[str, Any], request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    """segmentation -> pose-estimation -> depth-estimation -> tracking -> quality-check."""
    # Models and stages here, not at the top: the splat worker imports the app registry too.
    from core.stages.segment import mask_quality, segment_subject
    from core.tasks._sam2_prompts import check_inside
    from core.tasks.sam2 import load_model, read_clip
    from core.video import clip_info

    submit = OrbitSubmit.model_validate(job_input)
    staged = StagedProgress(ctx.progress, SPANS)
    info = clip_info(request)
    # Clicks are in the app's width x height space (the frames may be sent smaller); no
    # clicks: the middle of the frame, as Orbit's backend did.
    clicks = submit.prompt_points or [{"x": info.width / 2, "y": info.height / 2}]
    if not submit.prompt_points:
        ctx.warnings.append("no prompt_points: the subject is taken at the frame's centre")
    prompts = prompts_from_clicks(clicks)
    space_w = submit.width or info.width
    space_h = submit.height or info.height
    if (space_w, space_h) != (info.width, info.height):
        prompts = [p.scaled(info.width / space_w, info.height / space_h) for p in prompts]
        ctx.warnings.append(
            f"prompt_points scaled from {space_w}x{space_h} to the clip's "
            f"{info.width}x{info.height}"
        )
    check_inside(prompts, info.width, info.height, "frames")
    staged.start("segmentation", "Decoding the clip...")
    frames = read_clip(request, ctx)
    if len(frames) < 3:
        raise InvalidInput(f"the clip has {len(frames)} frames; Orbit needs at least 3")
    if submit.prompt_frame >= len(frames):
        raise InvalidInput(f"prompt_frame: the clip has {len(frames)} frames")
    pixels = [frame.pixels for frame in frames]
    work_h, work_w = pixels[0].shape[:2]

    # 1. segmentation
    staged.start("segmentation", MESSAGES["segmentation"])
    sam_ctx = replace(ctx, progress=staged.reporter_for("segmentation"))
    loaded = load_model(request, ctx)
    with ctx.timings.measure("segmentation"):
        masks = segment_subject(
            loaded, frames, info.width, info.height, prompts, submit.prompt_frame, sam_ctx
        )
    mask_metrics = mask_quality(masks)
    work_masks = [_resize_mask(m, work_w, work_h) for m in masks]

    outputs = _Outputs(ctx)
    work_dir = Path(tempfile.mkdtemp(prefix="orbit-", dir=ctx.settings.work_dir))
    try:
        # 2. pose-estimation
        staged.start("pose-estimation", MESSAGES["pose-estimation"])
        with ctx.timings.measure("pose-estimation"):
            solve, pose_metrics = _solve(pixels, work_masks, work_dir, submit.orbit, staged, ctx)
        # 3. depth-estimation
        staged.start("depth-estimation", MESSAGES["depth-estimation"])
        with ctx.timings.measure("depth-estimation"):
            depth, depth_metrics = _depth(pixels, work_masks, solve, submit.orbit, staged, ctx)
        # 4. tracking
        staged.start("tracking", MESSAGES["tracking"])
        with ctx.timings.measure("tracking"):
            tracks_doc, track_metrics = _tracks(pixels, work_masks, frames, info, submit, staged)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    # 5. quality-check
    staged.start("quality-check", MESSAGES["quality-check"])
    quality = {
        "mask": mask_metrics,
        "pose": pose_metrics,
        "track": track_metrics,
        "depth": depth_metrics,
    }
    median_depth = None
    if solve is not None:
        from core.stages.camera import scene_median_depth

        median_depth = scene_median_depth(solve)
    decision = decide(quality, max(work_w, work_h), median_depth)
    quality_report = {**quality, "gate_results": decision.gate_results}

    with ctx.timings.measure("upload"):
        staged.report("quality-check", 0.3, "Storing the assets...")
        assets = {
            "masks": [
                outputs.put(f"masks/mask_{i:06d}.png", _png(m.astype(np.uint8) * 255))
                for i, m in enumerate(masks)
            ],
            "poses": outputs.put(
                "poses/poses.json", _json(_poses_document(solve, frames, info, work_w))
            ),
            "depth": [
                outputs.put(f"depth/depth_{i:06d}.png", png)
                for i, png in enumerate(depth.pngs if depth is not None else [])
            ],
            "tracks": outputs.put("tracks/tracks.json", _json(tracks_doc)),
        }
        quality_doc = {
            **quality_report,
            "mode": decision.mode,
            "enforcedBounds": decision.bounds,
            "modeReasons": decision.reasons,
        }
        assets["quality"] = outputs.put("quality.json", _json(quality_doc))
    staged.report("quality-check", 1.0, f"Mode selected: {decision.mode}", force=True)
    return {
        "status": "completed",
        "mode": decision.mode,
        "bounds": decision.bounds,
        "mode_reasons": decision.reasons,
        "quality": quality_report,
        "assets": assets,
        "artifacts": outputs.records,
        "width": info.width,
        "height": info.height,
        "fps": round(info.fps, 3),
        "frame_count": len(frames),
        "frames": [{"frame_index": f.index, "time_s": round(f.time_s, 4)} for f in frames],
        "processing_size": [work_w, work_h],
    }


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


def _solve(
    pixels: list[np.ndarray],
    masks: list[np.ndarray],
    work_dir: Path,
    options: OrbitOptions,
    staged: StagedProgress,
    ctx: JobContext,
) -> tuple[Any, dict[str, Any]]:
    from core.stages.camera import pose_quality, solve_camera

    try:
        solve = solve_camera(
            pixels,
            masks,
            work_dir / "sfm",
            max_features=options.sfm_features,
            progress=staged.callback_for("pose-estimation"),
        )
    except SfmFailed as exc:
        ctx.warnings.append(f"pose-estimation: {exc}")
        solve = None
    return solve, pose_quality(solve, len(pixels))


@dataclass
class _Depth:
    pngs: list[bytes]


def _depth(
    pixels: list[np.ndarray],
    masks: list[np.ndarray],
    solve: Any,
    options: OrbitOptions,
    staged: StagedProgress,
    ctx: JobContext,
) -> tuple[_Depth, dict[str, Any]]:
    from core.stages.depth_anchors import depth_anchors
    from core.stages.video_depth import consistent_depth, depth_quality, depth_to_png16
    from core.tasks.depth import load_depth

    name = options.depth_model or OrbitSettings().depth_model
    with ctx.timings.measure("load_depth_model"):
        loaded = load_depth(name)
    anchors = depth_anchors(solve, masks) if solve is not None else None
    result = consistent_depth(
        loaded,
        pixels,
        masks,
        input_size=options.depth_input_size,
        anchors=anchors,
        progress=staged.callback_for("depth-estimation"),
    )
    pngs = [depth_to_png16(d, result.lo, result.hi) for d in result.depths]
    metrics = depth_quality(result, masks)
    metrics["png_range"] = {"lo": float(result.lo), "hi": float(result.hi), "kind": "disparity"}
    return _Depth(pngs), metrics


def _tracks(
    pixels: list[np.ndarray],
    masks: list[np.ndarray],
    frames: list[Any],
    info: Any,
    submit: OrbitSubmit,
    staged: StagedProgress,
) -> tuple[dict[str, Any], dict[str, Any]]:
    from core.stages.tracks import filter_tracks, track_clip, track_quality, tracks_document

    tracks = track_clip(
        pixels,
        masks,
        subject_points=submit.orbit.subject_points,
        background_points=submit.orbit.background_points,
        progress=staged.callback_for("tracking"),
    )
    keep = filter_tracks(tracks)
    document = tracks_document(tracks, keep, info.fps, [f.index for f in frames])
    # Tracks are measured on the processed frames; the document speaks the clip's pixels.
    scale = info.width / pixels[0].shape[1]
    if scale != 1.0:
        for track in document["tracks"]:
            for point in track["points"]:
                point["x"], point["y"] = point["x"] * scale, point["y"] * scale
    document["width"], document["height"] = info.width, info.height
    return document, track_quality(tracks, keep)


def _poses_document(solve: Any, frames: list[Any], info: Any, work_w: int) -> dict[str, Any]:
    """poses.json: the backend's fields (`camera`, `poses` with `image_id`, COLMAP's
    `rotation` quaternion (w, x, y, z) and `translation` of cam_from_world, `registered`) plus
    the PRD's contract: `transform`, T_world_from_cam, right-handed, row-major 4x4. Intrinsics
    are in the clip's own pixels."""
    scale = info.width / work_w
    document: dict[str, Any] = {
        "convention": {
            "transform": "T_world_from_cam, right-handed, row-major 4x4 (PRD A)",
            "rotation_translation": "COLMAP cam_from_world: x_cam = R x_world + t, "
            "quaternion (w, x, y, z); camera axes x right, y down, z forward",
            "units": "the solve's own (monocular: up to scale)",
        },
        "camera": None,
        "poses": [],
        "registered": 0,
        "total": len(frames),
    }
    if solve is None:
        document["poses"] = [
            {"image_id": i, "frame_index": f.index, "registered": False}
            for i, f in enumerate(frames)
        ]
        return document
    intr = solve.intrinsics
    document["camera"] = {
        "model": intr.get("model"),
        "width": info.width,
        "height": info.height,
        "fx": intr["fx"] * scale,
        "fy": intr["fy"] * scale,
        "cx": intr["cx"] * scale,
        "cy": intr["cy"] * scale,
        "distortion": intr.get("distortion", {}),
    }
    for i, (pose, frame) in enumerate(zip(solve.poses, frames, strict=True)):
        entry: dict[str, Any] = {
            "image_id": i,
            "frame_index": frame.index,
            "timestamp": round(frame.time_s, 4),
            "registered": bool(pose.registered),
        }
        if pose.registered:
            w2c = np.asarray(pose.world_to_camera)
            entry["rotation"] = [float(v) for v in _quaternion_wxyz(w2c[:3, :3])]
            entry["translation"] = [float(v) for v in w2c[:3, 3]]
            entry["transform"] = [float(v) for v in np.asarray(pose.camera_to_world).reshape(-1)]
            entry["reprojection_error"] = pose.reprojection_error
        document["poses"].append(entry)
    document["registered"] = sum(1 for p in solve.poses if p.registered)
    return document


def _quaternion_wxyz(rot: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(rot).as_quat()
    return np.array([w, x, y, z])


class _Outputs:
    """The job's asset files, through the job's artifact store; `put` answers the string
    Orbit reads for an asset (its URL, path or data URI) and keeps the full record."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.records: dict[str, dict[str, Any]] = {}

    def put(self, name: str, data: bytes) -> str:
        record = self.ctx.store.put(name, data)
        self.records[name] = record
        return asset_location(record)


def asset_location(record: dict[str, Any]) -> str:
    if record["storage"] == "s3":
        return str(record.get("public_url") or record["url"])
    if record["storage"] == "local":
        return str(record.get("public_url") or record["path"])
    return f"data:{record['content_type']};base64,{record['data']}"


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def _json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def shape_result(result: dict[str, Any], job_input: Any) -> dict[str, Any]:
    """Orbit's `get_job_result` body (the job id is added by whoever answers with it)."""
    return {key: value for key, value in result.items() if key not in ("task", "model")}


# --------------------------------------------------------------------------------------------
# The routes (`python -m core.serve handlers.infer --app orbit`)

STATUS = {
    "IN_QUEUE": "pending",
    "IN_PROGRESS": "processing",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "TIMED_OUT": "failed",
    "CANCELLED": "cancelled",
}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")


def status_body(job: JobView) -> dict[str, Any]:
    """`get_job_status`: `status` (pending | processing | completed | failed | cancelled),
    `stage`, `progress` (0-100 over the whole job), `message`, `created_at`, `updated_at`."""
    status = STATUS.get(job.status, "failed")
    progress = job.progress or {}
    stage = progress.get("stage")
    percent = float(progress.get("progress", 0.0)) if stage in SPANS else 0.0
    message = progress.get("message") or "Job submitted"
    if status == "pending":
        stage, percent, message = "upload", 0.0, "Job submitted"
    elif status == "completed":
        mode = job.output.get("mode") if isinstance(job.output, dict) else None
        stage, percent, message = "completed", 100.0, f"Complete. Mode: {mode}"
    elif status == "failed":
        message = job.error or "failed"
    elif status == "cancelled":
        message = "Cancelled by user"
    return {
        "job_id": job.id,
        "status": status,
        "stage": stage or "segmentation",
        "progress": round(percent, 1),
        "message": message,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
    }


def result_body(job: JobView, asset_url: Callable[[str], str] | None = None) -> dict[str, Any]:
    """`get_job_result`: the result once completed, else the backend's "Not completed"."""
    status = STATUS.get(job.status, "failed")
    if status != "completed" or not isinstance(job.output, dict):
        body = {"job_id": job.id, "status": status, "message": "Not completed"}
        if job.error:
            body["error"] = job.error
        return body
    result = {"job_id": job.id, **job.output, "status": "completed"}
    if asset_url is not None:  # local files: served by this server's `get_asset`
        local = {
            record.get("path"): name
            for name, record in job.output.get("artifacts", {}).items()
            if record.get("storage") == "local"
        }

        def locate(value: str) -> str:
            return asset_url(local[value]) if value in local else value

        assets = {}
        for key, value in job.output.get("assets", {}).items():
            assets[key] = [locate(v) for v in value] if isinstance(value, list) else locate(value)
        result["assets"] = assets
    return result


def _is_orbit(job: JobView) -> bool:
    return isinstance(job.input, dict) and recognises(job.input)


def routes(gateway: JobGateway) -> APIRouter:
    router = APIRouter(tags=["Orbit"])

    def not_found(job_id: str) -> JSONResponse:
        return JSONResponse({"error": "Job not found", "job_id": job_id}, status_code=404)

    def find(job_id: str) -> JobView | None:
        job = gateway.job(job_id)
        return job if job is not None and _is_orbit(job) else None

    @router.post("/submit_job")
    async def submit_job(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        if not recognises(body):
            body.setdefault("prompt_points", [])  # Orbit's body without clicks is still Orbit's
        try:
            to_native(body)
        except InvalidInput as exc:
            return JSONResponse({"error": str(exc), "error_code": "invalid_input"}, status_code=400)
        except ValueError as exc:  # pydantic's ValidationError: names the field
            message = " ".join(str(exc).split())[:500]
            return JSONResponse({"error": message, "error_code": "invalid_input"}, 400)
        job_id = gateway.submit(body)
        return {"job_id": job_id, "status": "pending", "message": "Job submitted successfully"}

    @router.get("/get_job_status")
    async def get_job_status(job_id: str) -> Any:
        job = find(job_id)
        return not_found(job_id) if job is None else status_body(job)

    @router.get("/get_job_result")
    async def get_job_result(job_id: str, request: Request) -> Any:
        job = find(job_id)
        if job is None:
            return not_found(job_id)
        base = str(request.base_url).rstrip("/")
        return result_body(job, lambda name: f"{base}/get_asset?job_id={job_id}&name={name}")

    @router.get("/get_asset")
    async def get_asset(job_id: str, name: str) -> Any:
        job = find(job_id)
        record = (job.output or {}).get("artifacts", {}).get(name) if job else None
        if not isinstance(record, dict) or record.get("storage") != "local":
            return JSONResponse({"error": f"no asset {name!r} for job {job_id}"}, 404)
        return FileResponse(record["path"], media_type=record.get("content_type"))

    @router.post("/cancel_job")
    async def cancel_job(job_id: str) -> Any:
        if find(job_id) is None:
            return not_found(job_id)
        job = gateway.cancel(job_id)
        cancelled = job is not None and job.status == "CANCELLED"
        return {"cancelled": cancelled, "job_id": job_id}

    @router.get("/list_jobs")
    async def list_jobs() -> dict[str, Any]:
        views, _ = gateway.list_jobs(limit=1000)
        return {"jobs": [status_body(v) for v in views if _is_orbit(v)][:20]}

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "healthy", "service": "orbit-backend", "version": "1.0.0"}

    @router.post("/upload_video")
    async def upload_video(file: UploadFile = File(...)) -> Any:  # noqa: B008 (FastAPI's idiom)
        suffix = Path(file.filename or "").suffix.lower()
        if suffix not in ALLOWED_VIDEO_EXTENSIONS:
            return JSONResponse(
                {"error": f"Invalid file type: {suffix or 'none'}. "
                 f"Allowed: {', '.join(ALLOWED_VIDEO_EXTENSIONS)}"},
                status_code=400,
            )  # fmt: skip
        video_id = f"vid_{secrets.token_hex(6)}"
        folder = Path(get_settings().upload_dir)
        folder.mkdir(parents=True, exist_ok=True)
        target, size = folder / video_id, 0
        partial = target.with_name(target.name + ".part")
        with partial.open("wb") as handle:
            while chunk := await file.read(1 << 20):
                size += len(chunk)
                if size > MAX_VIDEO_BYTES:
                    handle.close()
                    partial.unlink(missing_ok=True)
                    return JSONResponse(
                        {"error": f"File too large. Max size: {MAX_VIDEO_BYTES // 2**20}MB"}, 413
                    )
                handle.write(chunk)
        partial.rename(target)
        return {"video_id": video_id, "size_bytes": size, "filename": file.filename}

    return router


APP = App(
    name="orbit",
    title="Orbit",
    worker="infer",
    recognises=recognises,
    adapter=RequestAdapter(to_native=to_native, shape_result=shape_result, run_task=run_orbit),
    routes=routes,
)
