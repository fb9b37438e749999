"""VFX ingest platform: one job runs the asked stages on a persistent project.

Its pipeline (the seed's `run_pipeline`) takes `{"project_name", "stages": [...], "video"?,
"options": {<stage>: {...}}}` and runs, in the order asked, any of `ingest` (the plate as
`frame_%04d.png` at `fps`, default 24), `depth` (temporally consistent depth, 16-bit PNGs, one
scale per shot), `roto` (SAM 3 concepts, default `person, human`; SAM 2 point/box prompts
when the options give `objects`), `matte` (soft alpha from the roto masks), `cleanplate`
(the subject removed) and `colmap` (camera track -> `camera_data.json`, Nuke `.chan`, Blender
script). A stage that fails stops the job; the result has one entry per stage run, with the
seed's names (`ingest.frame_count`, `depth.depth_count`, `roto.mask_count`,
`colmap.num_cameras`), and `status` `completed` or `failed` (the seed's: a failed stage is
reported in the result, not as a job error).

Projects persist (`core/stages/project.py`): a job with the same `project_name` and no
`video` runs later stages on the kept frames. The web API (`--app vfx`): `POST /api/process`
(multipart `file`, `project_name`, `stages`), `GET /api/job/{job_id}`, `GET /health`, and the
project's files under `GET /api/projects/{name}/files[/{path}]`.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ConfigDict, Field, ValidationError, field_validator

from core.apps.base import App, JobGateway, JobView
from core.config import get_settings
from core.contract import JobContext, RequestAdapter, TaskRequest
from core.control import cancel_requested
from core.errors import Cancelled, InvalidInput, WorkerError, describe_validation_error
from core.media import VIDEO_TYPES, sniff_media_type
from core.naming import safe_name_error
from core.payload import Payload
from core.schemas import StrictModel, TaskOptions, VideoOptions
from core.stages.ingest import Ingested, ingest_frames, load_frames, read_manifest
from core.stages.project import FRAMES_DIR, PLATE_STEM, Project, path_error
from core.storage import BucketTarget

log = logging.getLogger("worker.vfx")

STAGES = ("ingest", "depth", "roto", "matte", "cleanplate", "colmap")
# Each stage's share of the job's progress, by its usual cost.
WEIGHTS = {"ingest": 1.0, "depth": 3.0, "roto": 3.0, "matte": 2.0, "cleanplate": 2.0, "colmap": 3.0}
NATIVE_TASK = "depth-estimation"
"""The task whose media rules the job's `video` follows (a video, or none); the app's own
`run_task` runs the stages, so nothing else of that task is used."""
DEFAULT_STAGES = ["ingest", "depth"]
DERIVED_FOLDERS = ("depth", "roto", "matte", "cleanplate", "colmap")
DEFAULT_PROJECT = "NewProject"
Progress = Callable[[float, str], None]


# --------------------------------------------------------------------------------------------
# Options, per stage


class IngestOptions(VideoOptions):
    fps: float | None = Field(
        default=24.0, gt=0, le=240, description="frames per second kept (null: every frame)"
    )
    max_frames: int = Field(default=2000, ge=1, le=10_000)
    max_side: int | None = Field(default=None, ge=64, le=8192, description="resize frames")


class DepthStageOptions(TaskOptions):
    model: str = "depth-anything-v2-small"
    input_size: int | None = Field(default=None, ge=14, le=2048)


class RotoOptions(TaskOptions):
    concepts: list[str] = Field(default_factory=lambda: ["person", "human"])
    model: str = "sam3.pt"
    threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    imgsz: int = Field(default=644, ge=112, le=2016)
    objects: list[dict[str, Any]] | None = Field(
        default=None, description="SAM 2 prompts instead of concepts: [{id, points, box, ...}]"
    )
    sam2_model: str = "sam2.1_hiera_tiny.pt"

    @field_validator("concepts", mode="before")
    @classmethod
    def _concepts(cls, value: Any) -> Any:
        from core.tasks.sam3 import parse_concepts

        return parse_concepts(value)


class MatteOptions(TaskOptions):
    method: Literal["auto", "vitmatte", "guided_filter"] = "auto"
    model: str = "vitmatte-small-composition-1k"
    erode_px: int = Field(default=3, ge=0, le=64)
    dilate_px: int = Field(default=6, ge=1, le=64)


class CleanplateOptions(TaskOptions):
    window: int = Field(default=30, ge=1, le=240)
    max_sources: int = Field(default=8, ge=1, le=60)
    dilate_px: int = Field(default=4, ge=0, le=64)
    inpaint_radius: int = Field(default=5, ge=1, le=32)


class ColmapOptions(TaskOptions):
    quality: Literal["low", "medium", "high"] = "medium"
    max_features: int | None = Field(default=None, ge=256, le=65536)
    camera_model: str = "SIMPLE_RADIAL"
    mask_subject: bool = Field(default=True, description="no features on the roto masks")


STAGE_OPTIONS: dict[str, type[TaskOptions]] = {
    "ingest": IngestOptions,
    "depth": DepthStageOptions,
    "roto": RotoOptions,
    "matte": MatteOptions,
    "cleanplate": CleanplateOptions,
    "colmap": ColmapOptions,
}


def parse_stages(value: Any) -> list[str]:
    """`"ingest,depth"` or `["ingest", "depth"]` -> known stage names, once each, as asked."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"a list of stages, or one comma-separated string, of {', '.join(STAGES)}")
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ValueError(
            f"unknown stage {', '.join(unknown) or '(none)'}; known: {', '.join(STAGES)}"
        )
    if len(set(names)) != len(names):
        raise ValueError("a stage is named twice")
    return names


class VfxSubmit(StrictModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    project_name: str
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    video: str | None = None
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("project_name")
    @classmethod
    def _safe(cls, value: str) -> str:
        problem = safe_name_error(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, value: Any) -> list[str]:
        return parse_stages(value)

    @field_validator("options")
    @classmethod
    def _option_stages(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(value) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage {', '.join(unknown)}; known: {', '.join(STAGES)}")
        return value

    def stage_options(self, stage: str, warnings: list[str]) -> Any:
        """The stage's options parsed (errors and unused keys named `options.<stage>.<key>`)."""
        kind, given = STAGE_OPTIONS[stage], self.options.get(stage, {})
        try:
            parsed = kind.model_validate(given)
        except ValidationError as exc:
            prefix = f"options.{stage}."
            raise InvalidInput(describe_validation_error(exc, prefix=prefix)) from exc
        unused = sorted(set(given) - set(kind.model_fields))
        warnings.extend(f"options.{stage}.{key} is not used by {stage}" for key in unused)
        return parsed


def recognises(job_input: dict[str, Any]) -> bool:
    return "task" not in job_input and "project_name" in job_input and "stages" in job_input


def to_native(job_input: dict[str, Any]) -> dict[str, Any]:
    submit = VfxSubmit.model_validate(job_input)  # a ValidationError names the field
    for stage in submit.stages:  # bad options fail before any download
        submit.stage_options(stage, [])
    if "ingest" not in submit.stages and submit.video is not None:
        raise InvalidInput("video: given, but the stages do not include ingest")
    native: dict[str, Any] = {"task": NATIVE_TASK}
    if submit.video is not None:
        native["video"] = submit.video
    return native


# --------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class JobState:
    """What the stages of one job share: the project and what was read from it once."""

    project: Project
    request: TaskRequest
    ctx: JobContext
    submit: VfxSubmit
    _ingested: Ingested | None = None
    _frames: list[np.ndarray] | None = None
    _masks: list[np.ndarray] | None = None
    pulled: set[str] = field(default_factory=set)

    def pull(self, relative: str) -> None:
        if relative not in self.pulled:
            self.project.pull(relative)
            self.pulled.add(relative)

    @property
    def ingested(self) -> Ingested:
        if self._ingested is None:
            self.pull("source")
            self._ingested = read_manifest(self.project)
        return self._ingested

    def frames(self) -> list[np.ndarray]:
        if self._frames is None:
            self._frames = load_frames(self.project, self.ingested)
        return self._frames

    def numbers(self) -> list[int]:
        return [record.number for record in self.ingested.frames]

    def masks(self, required: bool) -> list[np.ndarray] | None:
        """The roto subject masks; None (or `invalid_input` if `required`) without roto."""
        from core.stages.roto import read_combined

        if self._masks is None:
            self.pull("roto/all")
            if not (self.project.root / "roto" / "all").is_dir():
                if required:
                    raise InvalidInput(
                        f"project {self.project.name!r} has no roto masks: run roto first"
                    )
                return None
            self._masks = read_combined(self.project.root / "roto", self.numbers())
        return self._masks

    def set_masks(self, masks: list[np.ndarray]) -> None:
        self._masks = masks


def folder_entry(project: Project, relative: str, pattern: str) -> dict[str, Any]:
    """A stage's per-frame files, described once (not one record per file)."""
    files = project.list_files(relative)
    return {"dir": relative, "pattern": pattern, "count": len(files)}


def stage_ingest(state: JobState, options: IngestOptions, progress: Progress) -> dict[str, Any]:
    from core.video import clip_info, iter_clip_frames

    project, request = state.project, state.request
    if request.video is None:
        state.pull(str(Path(PLATE_STEM).parent))
        plate = project.plate()
        if plate is None:
            raise InvalidInput(
                "ingest: send `video` (or upload a plate with POST /api/process); project "
                f"{project.name!r} keeps none"
            )
        data = plate.read_bytes()
        request = TaskRequest(
            task="vfx",
            model=None,
            options=options,
            video=Payload(data, sniff_media_type(data), "project"),
        )
    else:
        request = TaskRequest(task="vfx", model=None, options=options, video=request.video)
    info = clip_info(request)
    expected = (
        int(info.duration_s * options.fps) + 1
        if options.fps and info.duration_s > 0
        else info.frame_count
    )
    frames = iter_clip_frames(
        request, options, max_side=options.max_side, warnings=state.ctx.warnings
    )
    ingested = ingest_frames(
        frames,
        project,
        fps=options.fps if options.fps and options.fps < info.fps else None,
        source_fps=info.fps,
        expected=min(expected, options.max_frames),
        progress=progress,
    )
    state._ingested, state._frames, state._masks = ingested, None, None
    # New frames: what earlier stages made from the old ones no longer matches them.
    for derived in DERIVED_FOLDERS:
        project.clear(derived)
    return {
        "frame_count": ingested.frame_count,
        "fps": round(ingested.fps, 6),
        "source_fps": round(ingested.source_fps, 6),
        "width": ingested.width,
        "height": ingested.height,
        "frames_dir": FRAMES_DIR,
        "files": {
            "frames": folder_entry(project, FRAMES_DIR, "frame_%04d.png"),
            "manifest": project.describe("source/manifest.json"),
        },
    }


def stage_depth(state: JobState, options: DepthStageOptions, progress: Progress) -> dict[str, Any]:
    project = state.project
    frames = state.frames()  # first: a project without frames says so whatever else is missing

    from core.encode import depth_to_png16
    from core.stages.video_depth import consistent_depth
    from core.tasks.depth import load_depth

    masks = state.masks(required=False)
    loaded = load_depth(options.model)
    depth = consistent_depth(
        loaded,
        frames,
        masks,
        input_size=options.input_size,
        progress=lambda f, m: progress(0.95 * f, m),
    )
    folder = project.folder("depth", empty=True)
    for number, disparity in zip(state.numbers(), depth.depths, strict=True):
        if cancel_requested():
            raise Cancelled("the job was cancelled (or ran past its execution timeout)")
        (folder / f"depth_{number:04d}.png").write_bytes(
            depth_to_png16(disparity, depth.lo, depth.hi)
        )
    scale = {
        "encoding": "16-bit PNG, disparity = lo + png / 65535 * (hi - lo), one scale per shot",
        "kind": "relative inverse depth (larger is nearer), aligned across the shot",
        "lo": float(depth.lo),
        "hi": float(depth.hi),
        "alignment": _jsonable(depth.alignment),
        "quality": _jsonable(depth.quality),
        "model": options.model,
    }
    (folder / "depth_scale.json").write_text(json.dumps(scale, indent=1))
    project.publish("depth")
    return {
        "depth_count": len(depth.depths),
        "depth_dir": "depth",
        "model": options.model,
        "lo": float(depth.lo),
        "hi": float(depth.hi),
        "quality": _jsonable(depth.quality),
        "files": {
            "depth": folder_entry(project, "depth", "depth_%04d.png"),
            "scale": project.describe("depth/depth_scale.json"),
        },
    }


def stage_roto(state: JobState, options: RotoOptions, progress: Progress) -> dict[str, Any]:
    from core.stages.roto import sam2_instances, sam3_instances, write_roto

    project, ctx = state.project, state.ctx
    frames = state.frames()
    ingested = state.ingested
    folder = project.folder("roto", empty=True)
    if options.objects:
        from core.tasks._sam2_model import load_sam2
        from core.tasks._sam2_prompts import Sam2Options, check_inside, prompts_from_options

        sam2_options = Sam2Options.model_validate({"objects": options.objects})
        prompts = prompts_from_options(sam2_options)
        check_inside(prompts, ingested.width, ingested.height, "options.roto.objects")
        positions = {p.id: _position(p.frame_index, state.numbers()) for p in prompts}
        loaded = load_sam2(options.sam2_model)
        per_frame: Any = sam2_instances(loaded, frames, prompts, positions, ctx)
        concepts, model = ["object"], options.sam2_model
    else:
        from core.tasks.sam3 import load_sam3

        loaded = load_sam3(options.model)
        per_frame = sam3_instances(
            loaded,
            frames,
            options.concepts,
            device=ctx.device,
            threshold=options.threshold,
            imgsz=options.imgsz,
        )
        concepts, model = options.concepts, options.model
    result = write_roto(
        per_frame,
        concepts,
        folder,
        state.numbers(),
        (ingested.height, ingested.width),
        progress=progress,
    )
    state.set_masks(result.combined)
    project.publish("roto")
    return {
        "mask_count": result.mask_count,
        "instance_mask_count": result.instance_mask_count,
        "frames_with_subject": result.frames_with_subject,
        "concepts": result.concepts,
        "instances": result.instances,
        "model": model,
        "roto_dir": "roto",
        "files": {
            folder_name: folder_entry(project, f"roto/{folder_name}", "mask_%04d.png")
            for folder_name in [*result.concepts.values(), "all"]
        },
    }


def _position(frame_number: int | None, numbers: list[int]) -> int:
    """A prompt's `frame_index` is a frame number of the sequence (1 = frame_0001.png)."""
    if frame_number is None:
        return 0
    if frame_number not in numbers:
        raise InvalidInput(
            f"options.roto.objects: frame {frame_number} is not among frames 1-{len(numbers)}"
        )
    return numbers.index(frame_number)


def stage_matte(state: JobState, options: MatteOptions, progress: Progress) -> dict[str, Any]:
    from core.stages.matte import matte_frames

    project = state.project
    masks = state.masks(required=True)
    assert masks is not None
    folder = project.folder("matte", empty=True)
    result = matte_frames(
        state.frames(),
        masks,
        folder,
        state.numbers(),
        method=options.method,
        model=options.model,
        erode_px=options.erode_px,
        dilate_px=options.dilate_px,
        progress=progress,
    )
    if result.fallback_reason:
        state.ctx.warnings.append(f"matte: guided-filter fallback: {result.fallback_reason}")
    project.publish("matte")
    return {
        "matte_count": len(result.files),
        "method": result.method,
        "fallback_reason": result.fallback_reason,
        "matte_dir": "matte",
        "files": {"matte": folder_entry(project, "matte", "matte_%04d.png")},
    }


def stage_cleanplate(
    state: JobState, options: CleanplateOptions, progress: Progress
) -> dict[str, Any]:
    from core.stages.cleanplate import clean_plates

    project = state.project
    masks = state.masks(required=True)
    assert masks is not None
    folder = project.folder("cleanplate", empty=True)
    result = clean_plates(
        state.frames(),
        masks,
        folder,
        state.numbers(),
        window=options.window,
        max_sources=options.max_sources,
        dilate_px=options.dilate_px,
        inpaint_radius=options.inpaint_radius,
        progress=progress,
    )
    project.publish("cleanplate")
    return {
        "cleanplate_count": len(result.files),
        "method": "homography-warped neighbours (robust median) + Telea inpainting",
        "filled_share": result.shares(),
        "removed_pixels": result.hole_pixels,
        "cleanplate_dir": "cleanplate",
        "files": {"cleanplate": folder_entry(project, "cleanplate", "cleanplate_%04d.png")},
    }


def stage_colmap(state: JobState, options: ColmapOptions, progress: Progress) -> dict[str, Any]:
    import tempfile

    project = state.project
    frames = state.frames()  # first: a project without frames says so whatever else is missing

    from core.stages.camera import QUALITY_FEATURES, solve_camera
    from core.stages.camera_export import Intrinsics, blender_script, camera_data, nuke_chan

    masks = state.masks(required=False) if options.mask_subject else None
    if masks is None:
        masks = [np.zeros(f.shape[:2], bool) for f in frames]
    features = options.max_features or QUALITY_FEATURES[options.quality]
    work_parent = state.ctx.settings.work_dir
    with tempfile.TemporaryDirectory(
        prefix="vfx-colmap-", dir=str(work_parent) if work_parent else None
    ) as work:
        solve = solve_camera(
            frames,
            masks,
            Path(work),
            quality=options.quality,
            max_features=features,
            matching="sequential",
            camera_model=options.camera_model,
            progress=lambda f, m: progress(0.95 * f, m),
        )
    intrinsics = Intrinsics.from_dict(_intrinsics_dict(solve.intrinsics))
    data = camera_data(
        state.ingested,
        intrinsics,
        solve.poses,
        solver={
            "quality": options.quality,
            "max_features": features,
            "matching": "sequential",
            "single_camera": True,
            "camera_model": options.camera_model,
            "masked_subject": options.mask_subject and state.masks(required=False) is not None,
            "median_reprojection_error": _jsonable(solve.median_reprojection_error()),
        },
    )
    folder = project.folder("colmap", empty=True)
    (folder / "camera_data.json").write_text(json.dumps(data, indent=1))
    (folder / "camera.chan").write_text(nuke_chan(data))
    (folder / "camera_blender.py").write_text(blender_script(data))
    project.publish("colmap")
    return {
        "num_cameras": data["num_cameras"],
        "frame_count": data["frame_count"],
        "registered_fraction": round(data["num_cameras"] / max(1, data["frame_count"]), 4),
        "quality": options.quality,
        "max_features": features,
        "median_reprojection_error": _jsonable(solve.median_reprojection_error()),
        "camera_data_path": "colmap/camera_data.json",
        "camera_data": project.describe("colmap/camera_data.json"),
        "files": {
            "camera_data": project.describe("colmap/camera_data.json"),
            "nuke_chan": project.describe("colmap/camera.chan"),
            "blender_script": project.describe("colmap/camera_blender.py"),
        },
    }


def _intrinsics_dict(values: dict[str, Any]) -> dict[str, Any]:
    distortion = values.get("distortion")
    if isinstance(distortion, dict):
        distortion = {str(k): float(v) for k, v in distortion.items()}
    elif distortion:
        distortion = {f"k{i + 1}": float(v) for i, v in enumerate(distortion)}
    return {**values, "distortion": distortion or {}}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(vars(value))
    return value


RUNNERS: dict[str, Callable[[JobState, Any, Progress], dict[str, Any]]] = {
    "ingest": stage_ingest,
    "depth": stage_depth,
    "roto": stage_roto,
    "matte": stage_matte,
    "cleanplate": stage_cleanplate,
    "colmap": stage_colmap,
}


def run_pipeline(
    job_input: dict[str, Any], request: TaskRequest, ctx: JobContext
) -> dict[str, Any]:
    """The asked stages, in order, on the project; a failing stage stops the job."""
    submit = VfxSubmit.model_validate(job_input)
    project = Project(submit.project_name, ctx.settings, ctx.store.bucket)
    state = JobState(project, request, ctx, submit)
    output: dict[str, Any] = {"project_name": project.name, "stages": submit.stages}
    total = sum(WEIGHTS[stage] for stage in submit.stages)
    done = 0.0
    status = "completed"
    try:
        for stage in submit.stages:
            options = submit.stage_options(stage, ctx.warnings)
            start, span = 100 * done / total, 100 * WEIGHTS[stage] / total

            def progress(
                fraction: float,
                message: str,
                stage: str = stage,
                start: float = start,
                span: float = span,
            ) -> None:
                ctx.progress.update(
                    stage,
                    start + span * max(0.0, min(1.0, fraction)),
                    message,
                    stage_progress=round(100 * fraction, 1),
                )

            ctx.progress.update(stage, start, f"{stage}: starting", force=True)
            started = time.perf_counter()
            try:
                with ctx.timings.measure(stage):
                    entry = RUNNERS[stage](state, options, progress)
            except Cancelled:
                raise
            except WorkerError as exc:
                entry = {"status": "failed", "error": exc.message, "error_code": exc.code}
            except ValidationError as exc:
                entry = {
                    "status": "failed",
                    "error": describe_validation_error(exc, prefix=f"options.{stage}."),
                    "error_code": "invalid_input",
                }
            except Exception as exc:  # a stage's bug stops the job with its message
                log.exception("vfx stage %s failed", stage)
                entry = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "error_code": "internal",
                }
            else:
                entry = {"status": "completed", **entry}
            entry["timings_ms"] = {"total": round((time.perf_counter() - started) * 1000, 2)}
            entry["project_name"] = project.name
            output[stage] = entry
            done += WEIGHTS[stage]
            if entry["status"] != "completed":
                status = "failed"
                output["failed_stage"] = stage
                # The seed reports a failed stage in the result (RunPod's job COMPLETED);
                # a top-level `error` would make it a job error and drop the stage entries.
                output["stage_error"] = f"{stage}: {entry['error']}"
                output["stage_error_code"] = entry["error_code"]
                break
            ctx.progress.update(stage, 100 * done / total, f"{stage}: completed", force=True)
    finally:
        output["project"] = {"storage": project.mode, **_where(project)}
        project.close()
    output["status"] = status
    return output


def _where(project: Project) -> dict[str, Any]:
    if project.mode == "s3":
        assert project.bucket is not None
        return {"bucket": project.bucket.bucket, "prefix": project.key("") + "/"}
    return {"path": str(project.root.resolve())}


def shape_result(result: dict[str, Any], job_input: Any) -> dict[str, Any]:
    """The seed's `run_pipeline` shape: `project_name`, one entry per stage, `status`; the
    native task's name (only its media rules were used) is not part of it."""
    return {k: v for k, v in result.items() if k not in ("task", "model")}


# --------------------------------------------------------------------------------------------
# The web API on the local server


def job_status(job: JobView) -> str:
    """The seed's statuses: submitted, running, completed, failed."""
    if job.status == "IN_QUEUE":
        return "submitted"
    if job.status == "IN_PROGRESS":
        return "running"
    if job.status == "COMPLETED":
        output = job.output if isinstance(job.output, dict) else {}
        return "failed" if output.get("status") == "failed" or "error" in output else "completed"
    return "failed"


def _text(fields: dict[str, str | None], name: str) -> str | None:
    value = fields.get(name)
    return value.strip() if isinstance(value, str) else None


def routes(gateway: JobGateway) -> APIRouter:

    def refused(status_code: int, detail: str) -> Exception:
        return HTTPException(status_code, detail={"error": detail, "detail": detail})

    async def check_key(request: Request) -> None:
        expected = gateway.api_key()
        if expected is None:
            return
        given = request.headers.get("x-api-key", "")
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = given or (credentials.strip() if scheme.lower() == "bearer" else "")
        if not given or not secrets.compare_digest(given.encode(), expected.encode()):
            raise refused(
                401, "missing or wrong API key (Authorization: Bearer <key>, or X-API-Key)"
            )

    def open_project(name: str) -> Project:
        settings = get_settings()
        try:
            return Project(name, settings, BucketTarget.from_settings(settings))
        except InvalidInput as exc:
            raise refused(422 if safe_name_error(name) else 503, exc.message) from None

    router = APIRouter(tags=["VFX ingest"])
    keyed = APIRouter(dependencies=[Depends(check_key)])

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @keyed.post("/api/process")
    async def process(
        request: Request,
        file: UploadFile | None = File(default=None),  # noqa: B008 (FastAPI's idiom)
        project_name: str | None = Form(default=None),
        stages: str | None = Form(default=None),
        options: str | None = Form(default=None),
    ) -> dict[str, Any]:
        # python-multipart spools the upload to a temporary file as it arrives.
        limit = get_settings().max_input_bytes
        if file is not None and (file.size or 0) > limit:
            raise refused(413, f"the upload is over {limit} bytes (MAX_INPUT_BYTES)")
        plate = await file.read() if file is not None else None
        fields = {"project_name": project_name, "stages": stages, "options": options}
        query = request.query_params
        name = _text(fields, "project_name") or query.get("project_name") or DEFAULT_PROJECT
        stages_text = _text(fields, "stages") or query.get("stages") or ",".join(DEFAULT_STAGES)
        options_text = _text(fields, "options") or query.get("options")
        try:
            stage_options = json.loads(options_text) if options_text else {}
            submit = VfxSubmit.model_validate(
                {"project_name": name, "stages": stages_text, "options": stage_options}
            )
            to_native(submit.model_dump(exclude_none=True))
        except ValidationError as exc:
            raise refused(422, describe_validation_error(exc)) from None
        except (ValueError, InvalidInput) as exc:
            raise refused(422, getattr(exc, "message", str(exc))) from None
        if plate is None and "ingest" in submit.stages:
            raise refused(422, "file: the plate (a video) is required for the ingest stage")
        project = open_project(submit.project_name)
        try:
            if plate is not None:
                media_type = sniff_media_type(plate)
                if media_type not in VIDEO_TYPES:
                    raise refused(415, f"file: not a video ({media_type or 'unknown type'})")
                suffix = mimetypes.guess_extension(media_type or "") or ".mp4"
                for kept in project.list_files("source"):  # one plate: the new one
                    if kept.path.startswith(f"{PLATE_STEM}."):
                        project.remove(kept.path)
                project.save(f"{PLATE_STEM}{suffix}", plate)
        finally:
            project.close()
        job_id = gateway.submit(submit.model_dump(exclude_none=True))
        return {"job_id": job_id, "status": "submitted"}

    @keyed.get("/api/job/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        view = gateway.job(job_id)
        if view is None or not (isinstance(view.input, dict) and recognises(view.input)):
            raise refused(404, "Job not found")
        status = job_status(view)
        progress = view.progress or {}
        body: dict[str, Any] = {
            "job_id": view.id,
            "status": status,
            "stage": progress.get("stage"),
            "progress": 100.0 if view.status == "COMPLETED" else progress.get("progress", 0.0),
            "message": progress.get("message"),
            "result": view.output if view.status == "COMPLETED" else None,
        }
        if status == "failed":
            output = view.output if isinstance(view.output, dict) else {}
            body["error"] = view.error or output.get("stage_error") or view.status
        return body

    @keyed.get("/api/projects/{name}/files")
    async def list_files(name: str) -> dict[str, Any]:
        project = open_project(name)
        try:
            files = [
                {
                    "path": f.path,
                    "bytes": f.bytes,
                    "url": f"/api/projects/{project.name}/files/{f.path}",
                }
                for f in project.list_files()
            ]
        finally:
            project.close()
        return {"project_name": name, "files": files, "count": len(files)}

    @keyed.get("/api/projects/{name}/files/{path:path}")
    async def get_file(name: str, path: str) -> Any:
        problem = path_error(path)
        if problem:
            raise refused(404, f"no such file: {problem}")
        project = open_project(name)
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if project.mode == "local":
            local = (project.root / path).resolve()
            project.close()
            if not local.is_relative_to(project.root.resolve()) or not local.is_file():
                raise refused(404, f"no such file: {path}")
            return FileResponse(local, media_type=media)
        from core.storage import s3_client

        assert project.bucket is not None
        bucket, key = project.bucket, project.key(path)
        project.close()
        client = s3_client(bucket, get_settings())
        try:
            body = client.get_object(Bucket=bucket.bucket, Key=key)["Body"]
        except Exception:
            raise refused(404, f"no such file: {path}") from None

        def chunks() -> Iterator[bytes]:
            with body:
                yield from body.iter_chunks(1024 * 1024)

        return StreamingResponse(chunks(), media_type=media)

    router.include_router(keyed)
    return router


APP = App(
    name="vfx",
    title="VFX ingest platform",
    worker="infer",
    recognises=recognises,
    adapter=RequestAdapter(to_native=to_native, shape_result=shape_result, run_task=run_pipeline),
    routes=routes,
)
