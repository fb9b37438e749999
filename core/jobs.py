"""The infer job, from RunPod's job dict to a result dict: validate, fetch, decode, run, report.

Everything a task needs arrives in a `TaskRequest` (parsed options, decoded images or video
bytes) and a `JobContext` (settings, artifact store, progress, device, timings).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from core.config import Settings, get_settings
from core.errors import InvalidInput, MediaDecodeFailed, error_result
from core.media import VIDEO_TYPES, DecodedImage, decode_image
from core.models import resolve_device
from core.payload import Payload, load_payload
from core.progress import ProgressReporter, ProgressSink
from core.schemas import InferRequest, TaskOptions
from core.storage import ArtifactStore, BucketTarget
from core.tasks import Task, get_task

log = logging.getLogger("worker.jobs")


class Timings:
    def __init__(self) -> None:
        self._ms: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - started) * 1000)

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._ms[stage] = self._ms.get(stage, 0.0) + ms

    def as_dict(self) -> dict[str, float]:
        return {stage: round(ms, 2) for stage, ms in self._ms.items()}


@dataclass
class JobContext:
    job: dict[str, Any]
    settings: Settings
    store: ArtifactStore
    progress: ProgressReporter
    device: str
    timings: Timings = field(default_factory=Timings)
    warnings: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return str(self.job.get("id", "local"))


@dataclass
class TaskRequest:
    task: str
    model: str | None
    options: TaskOptions
    annotate: bool = False
    images: list[DecodedImage] = field(default_factory=list)
    video: Payload | None = None
    frames: list[DecodedImage] | None = None
    """A clip sent as images (`frames`), in order; `frames_fps` is its rate."""
    frames_fps: float | None = None
    raw: InferRequest | None = None


@lru_cache(maxsize=1)
def worker_device() -> str:
    return resolve_device(get_settings().device)


def run_infer_job(job: dict[str, Any], sink: ProgressSink | None = None) -> dict[str, Any]:
    """Run one job; never raises. Errors come back as `error`/`error_code` results."""
    settings = get_settings()
    job_id = str(job.get("id", "local"))
    started = time.perf_counter()
    progress = ProgressReporter(job, sink, settings.progress_min_interval_s)
    try:
        result = _run(job, settings, progress)
    except Exception as exc:  # the one place every failure becomes a result
        result = error_result(exc, job_id)
    finally:
        progress.close()
    timings = result.setdefault("timings_ms", {})
    timings["total"] = round((time.perf_counter() - started) * 1000, 2)
    result.setdefault("device", worker_device())
    if settings.result_path:
        write_result_file(settings, result)
    return result


def _run(job: dict[str, Any], settings: Settings, progress: ProgressReporter) -> dict[str, Any]:
    raw_input = job.get("input")
    if not isinstance(raw_input, dict):
        raise InvalidInput("the job's input must be a JSON object with a `task`")
    if "task" not in raw_input and "frames" in raw_input and "prompt_points" in raw_input:
        # The Orbit app sends its clip and clicks with no task name: that is SAM 2's job.
        raw_input = {**raw_input, "task": "sam2-segmentation"}
    request = InferRequest.model_validate(raw_input)  # a ValidationError names the field
    task = get_task(request.task)
    options, warnings = task.options.parse(request.options, task.name)
    warnings += [f"{name} is not a known input field" for name in request.unknown_fields()]

    bucket = BucketTarget.from_job(job.get("s3Config"), settings) or BucketTarget.from_settings(
        settings
    )
    ctx = JobContext(
        job=job,
        settings=settings,
        store=ArtifactStore(settings, str(job.get("id", "local")), bucket),
        progress=progress,
        device=worker_device(),
        warnings=warnings,
    )
    task_request = TaskRequest(
        task=task.name,
        model=request.model or task.default_model,
        options=options,
        annotate=bool(request.annotate or getattr(options, "annotate", False)),
        raw=request,
    )
    _attach_media(task, request, task_request, ctx, bucket)

    output = task.run(task_request, ctx)
    result: dict[str, Any] = {"task": task.name}
    if task_request.model:
        result["model"] = task_request.model
    result.update(output)
    result["device"] = ctx.device
    result["timings_ms"] = ctx.timings.as_dict()
    if ctx.warnings:
        result["warnings"] = ctx.warnings
    return result


def _attach_media(
    task: Task,
    request: InferRequest,
    task_request: TaskRequest,
    ctx: JobContext,
    bucket: BucketTarget | None,
) -> None:
    given = {
        name: getattr(request, name)
        for name in ("image", "images", "video", "frames", "payloadBase64")
        if getattr(request, name) is not None
    }
    if not task.media:
        return
    if len(given) > 1:
        raise InvalidInput(
            f"send only one of image, images, video, frames, payloadBase64 (got {', '.join(given)})"
        )
    if not given:
        wanted = " or ".join(f"`{m}`" for m in sorted(task.media))
        if "image" in task.media:
            wanted += " (or `images`, or the Studio's `payloadBase64`)"
        raise InvalidInput(f"{task.name} needs {wanted}")
    settings = ctx.settings
    ((field_name, value),) = given.items()

    if field_name in ("images", "frames"):
        # A list: a batch of images, or a clip sent as images (the Orbit app's `frames`).
        medium, limit, setting, what = (
            ("image", settings.max_batch_images, "MAX_BATCH_IMAGES", "images")
            if field_name == "images"
            else ("video", settings.max_input_frames, "MAX_INPUT_FRAMES", "a clip (`frames`)")
        )
        if medium not in task.media:
            raise InvalidInput(f"{task.name} does not take {what}")
        if len(value) > limit:
            raise InvalidInput(
                f"{field_name} has {len(value)} items; the limit is {limit} ({setting})"
            )
        refs = [(f"{field_name}[{i}]", ref) for i, ref in enumerate(value)]
    else:
        refs = [(field_name, value)]

    def fetch(item: tuple[str, str]) -> Payload:
        return load_payload(item[1], settings, field=item[0], bucket=bucket)

    with ctx.timings.measure("fetch"):
        if len(refs) == 1:
            payloads = [fetch(refs[0])]
        else:
            with ThreadPoolExecutor(max_workers=4) as pool:
                payloads = list(pool.map(fetch, refs))

    is_video = field_name == "video" or (
        field_name == "payloadBase64" and payloads[0].media_type in VIDEO_TYPES
    )
    if is_video:
        if "video" not in task.media:
            raise InvalidInput(f"{task.name} takes images, not video")
        media_type = payloads[0].media_type
        if media_type is not None and media_type not in VIDEO_TYPES:
            raise MediaDecodeFailed(
                f"{field_name}: the bytes are {media_type}, not a video; send an image as `image`"
            )
        task_request.video = payloads[0]
        return
    if "image" not in task.media and field_name != "frames":
        raise InvalidInput(f"{task.name} takes `video`")

    def decode(pair: tuple[tuple[str, str], Payload]) -> DecodedImage:
        return decode_image(pair[1].data, max_pixels=settings.max_image_pixels, field=pair[0][0])

    with ctx.timings.measure("decode"):
        if len(payloads) == 1:
            task_request.images = [decode((refs[0], payloads[0]))]
        else:  # OpenCV releases the GIL while decoding
            with ThreadPoolExecutor(max_workers=2) as pool:
                task_request.images = list(pool.map(decode, zip(refs, payloads, strict=True)))
    if field_name == "frames":
        sizes = {(image.width, image.height) for image in task_request.images}
        if len(sizes) > 1:
            raise InvalidInput(f"frames must all have one size; got {sorted(sizes)}")
        task_request.frames, task_request.images = task_request.images, []
        task_request.frames_fps = request.fps


def write_result_file(settings: Settings, result: dict[str, Any]) -> None:
    """RESULT_PATH: the whole result as JSON (the SDK's local log cuts it at 4 KB)."""
    try:
        path = settings.result_path
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    except OSError:
        log.exception("could not write RESULT_PATH")


def parse_preload(spec: str) -> list[tuple[str, str | None]]:
    """`object-detection, pose-estimation=yolo11s-pose.pt` -> [(task, model or None), ...]."""
    entries = []
    for item in spec.split(","):
        item = item.strip()
        if item:
            task, _, model = item.partition("=")
            entries.append((task.strip(), model.strip() or None))
    return entries


def preload(spec: str) -> list[dict[str, Any]]:
    """Load and pin every model PRELOAD_MODELS names; raises on the first that fails."""
    loaded = []
    for task_name, model in parse_preload(spec):
        task = get_task(task_name)
        name = model or task.default_model
        if task.load is None or name is None:
            raise InvalidInput(f"PRELOAD_MODELS: task {task_name} has no model to preload")
        loaded.append(task.load(name).describe())
    return loaded


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
