"""The infer job, from RunPod's job dict to a result dict: validate, fetch, decode, run, report.

Everything a task needs arrives in a `TaskRequest` (parsed options, decoded images or video
bytes) and a `JobContext` (settings, artifact store, progress, device, timings), both from
`core/contract.py`. The envelope (never raise, timings, device, RESULT_PATH) is the worker
shell's (`core/worker.py`); a request in an app's shape comes with that app's adapter.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.contract import JobContext, RequestAdapter, TaskRequest
from core.errors import InvalidInput, MediaDecodeFailed
from core.media import (
    VIDEO_TYPES,
    DecodedImage,
    ImageFrames,
    ImageHeader,
    decode_pixels,
    read_image_headers,
)
from core.models import worker_device
from core.payload import Payload, load_payload
from core.progress import ProgressSink
from core.schemas import InferRequest
from core.storage import ArtifactStore, BucketTarget
from core.tasks import Task, get_task
from core.worker import JobRun, run_job

MEDIA_FIELDS = ("image", "images", "video", "frames", "media")


def run_infer_job(
    job: dict[str, Any], sink: ProgressSink | None = None, adapter: RequestAdapter | None = None
) -> Any:
    """Run one job; never raises. Errors come back as `error`/`error_code` results."""
    return run_job(
        job, lambda run: _run(run, adapter), sink, adapter.shape_result if adapter else None
    )


def _run(run: JobRun, adapter: RequestAdapter | None) -> dict[str, Any]:
    app_input = run.job.get("input")
    if not isinstance(app_input, dict):
        raise InvalidInput("the job's input must be a JSON object with a `task`")
    raw_input = adapter.to_native(app_input) if adapter else app_input
    request = InferRequest.model_validate(raw_input)  # a ValidationError names the field
    task = get_task(request.task)
    options, warnings = task.options.parse(request.options, task.name)
    warnings += [f"{name} is not a known input field" for name in request.unknown_fields()]

    bucket = run.bucket()
    ctx = JobContext(
        job=run.job,
        settings=run.settings,
        store=ArtifactStore(run.settings, run.job_id, bucket),
        progress=run.progress,
        device=worker_device(),
        timings=run.timings,
        warnings=warnings,
    )
    task_request = TaskRequest(
        task=task.name,
        model=request.model or task.default_model,
        options=options,
        annotate=bool(request.annotate or getattr(options, "annotate", False)),
    )
    # An app's own job (run_task) may run on what it kept from earlier jobs: media optional.
    _attach_media(
        task, request, task_request, ctx, bucket, required=not (adapter and adapter.run_task)
    )

    if adapter and adapter.run_task:
        output = adapter.run_task(app_input, task_request, ctx)
    else:
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
    *,
    required: bool = True,
) -> None:
    given = {
        name: getattr(request, name) for name in MEDIA_FIELDS if getattr(request, name) is not None
    }
    if not task.media:
        return
    if len(given) > 1:
        raise InvalidInput(f"send only one of {', '.join(MEDIA_FIELDS)} (got {', '.join(given)})")
    if not given:
        if not required:
            return
        wanted = " or ".join(f"`{m}`" for m in sorted(task.media))
        if "image" in task.media:
            wanted += " (or `images`, or `media`)"
        raise InvalidInput(f"{task.name} needs {wanted}")
    settings = ctx.settings
    ((field_name, value),) = given.items()

    if field_name in ("images", "frames"):
        # A list: a batch of images, or a clip sent as images (`frames`).
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
        field_name == "media" and payloads[0].media_type in VIDEO_TYPES
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

    # Every header first: the request's whole pixel budget, and one size for a clip, are
    # checked before anything is decoded.
    items = [(ref[0], payload.data) for ref, payload in zip(refs, payloads, strict=True)]
    headers = read_image_headers(
        items,
        max_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
        field=field_name,
        one_size=field_name == "frames",
    )
    if field_name == "frames":  # decoded one at a time as the task reads them
        task_request.frames = ImageFrames(items, headers[0], settings.max_image_pixels)
        task_request.frames_fps = request.fps
        return

    def decode(pair: tuple[tuple[str, bytes], ImageHeader]) -> DecodedImage:
        (name, data), header = pair
        return decode_pixels(data, header, field=name)

    with ctx.timings.measure("decode"):
        if len(items) == 1:
            task_request.images = [decode((items[0], headers[0]))]
        else:  # OpenCV releases the GIL while decoding
            with ThreadPoolExecutor(max_workers=2) as pool:
                task_request.images = list(pool.map(decode, zip(items, headers, strict=True)))


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
