"""What detection, segmentation and pose share: loading Ultralytics models, one batched
predict, turning `Results` into our response entities, and the annotated preview."""

from __future__ import annotations

import os
from collections.abc import Generator
from contextlib import closing
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from core.annotate import ClipAnnotator, sample_rate
from core.contract import JobContext, TaskRequest
from core.encode import encode_mask, image_to_jpeg
from core.errors import InvalidInput
from core.media import VideoFrame
from core.models import LoadedModel, get_registry, worker_device
from core.schemas import Detection, ImageResult, Keypoint, YoloOptions
from core.video import clip_info, frame_stamp, is_clip, iter_clip_frames, per_frame_output

# Never let Ultralytics pip-install missing export backends inside a worker.
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

MODEL_SUFFIXES = (".pt", ".onnx", ".torchscript", ".engine")
TASK_KINDS = {"detect": "a detection", "segment": "a segmentation", "pose": "a pose"}
EXAMPLES = {"detect": "yolo11n.pt", "segment": "yolo11n-seg.pt", "pose": "yolo11n-pose.pt"}


def normalise_name(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if not suffix:
        return f"{name}.pt"
    if suffix not in MODEL_SUFFIXES:
        raise InvalidInput(
            f"model {name!r}: Ultralytics weights must end in {', '.join(MODEL_SUFFIXES)}"
        )
    return name


def keep_torch_threads() -> None:
    """Ultralytics' `select_device` sets torch's CPU threads to cpu_count - 1 on every predict
    (meant for its own training loaders): on a 2-core worker that halves every other model's
    speed. Its constant is pointed at the process's own setting instead."""
    import torch
    from ultralytics.utils import torch_utils

    torch_utils.NUM_THREADS = torch.get_num_threads()


def _load(path: Path) -> Any:
    from ultralytics import YOLO

    keep_torch_threads()

    model = YOLO(str(path))
    if model.task not in TASK_KINDS:
        raise InvalidInput(f"{path.name} is a {model.task} model, not detect, segment or pose")
    return model


def _download(target: Path) -> None:
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    if target.name not in GITHUB_ASSETS_NAMES:
        raise FileNotFoundError(f"{target.name} is not an Ultralytics release asset")
    attempt_download_asset(target)


def load_yolo(name: str, kind: str, *, pin: bool = False) -> LoadedModel:
    """Load (once) and check it is the kind the task needs (detect, segment or pose)."""
    name = normalise_name(name)
    loaded = get_registry().get("ultralytics", name, _load, _download, pin=pin)
    actual = loaded.model.task
    if actual != kind:
        raise InvalidInput(
            f"model {name!r} is {TASK_KINDS.get(actual, actual)} model; this task needs "
            f"{TASK_KINDS[kind]} model such as {EXAMPLES[kind]}"
        )
    return loaded


def warm_up(loaded: LoadedModel, device: str) -> None:
    """One tiny predict so the first job does not pay for fusing layers and set-up."""
    with loaded.lock:
        loaded.model.predict(np.zeros((64, 64, 3), np.uint8), device=device, verbose=False)


@lru_cache(maxsize=1)
def coco_names() -> dict[int, str]:
    from ultralytics.cfg import get_cfg  # noqa: F401 - ensures the package data is present
    from ultralytics.utils import ROOT, YAML

    return {int(k): str(v) for k, v in YAML.load(ROOT / "cfg/datasets/coco.yaml")["names"].items()}


@lru_cache(maxsize=1)
def coco_keypoint_names() -> tuple[str, ...]:
    from ultralytics.utils import ROOT, YAML

    return tuple(YAML.load(ROOT / "cfg/datasets/coco-pose.yaml")["kpt_names"][0])


def class_names(model: Any) -> dict[int, str]:
    """The model's names, or COCO's where an 80-class model only carries its indices."""
    names = {int(k): str(v) for k, v in dict(model.names).items()}
    if len(names) == 80 and all(v == str(k) for k, v in names.items()):
        return coco_names()
    return names


def keypoint_names(model: Any, count: int) -> tuple[str, ...]:
    names = getattr(model.model, "kpt_names", None)
    if isinstance(names, dict) and names:
        first = next(iter(names.values()))
        if len(first) == count:
            return tuple(str(n) for n in first)
    if count == 17:
        return coco_keypoint_names()
    return tuple(f"kp{i}" for i in range(count))


def class_ids(wanted: list[int | str] | None, names: dict[int, str]) -> list[int] | None:
    if not wanted:
        return None
    lookup = {v.lower(): k for k, v in names.items()}
    ids = []
    for item in wanted:
        if isinstance(item, int):
            if item not in names:
                raise InvalidInput(
                    f"options.classes: id {item} is not in this model (0..{len(names) - 1})"
                )
            ids.append(item)
        elif item.lower() in lookup:
            ids.append(lookup[item.lower()])
        elif item.isdigit() and int(item) in names:
            ids.append(int(item))
        else:
            sample = ", ".join(list(names.values())[:12])
            raise InvalidInput(
                f"options.classes: {item!r} is not a class of this model ({sample}, ...)"
            )
    return ids


def predict_args(
    loaded: LoadedModel, options: YoloOptions, ctx: JobContext, **extra: Any
) -> dict[str, Any]:
    """Ultralytics' predict/track arguments from the task's options."""
    return dict(
        conf=options.threshold,
        iou=options.iou,
        max_det=options.max_det,
        imgsz=options.imgsz,
        classes=class_ids(options.classes, class_names(loaded.model)),
        agnostic_nms=options.agnostic_nms,
        device=ctx.device,
        verbose=False,
        **half_precision(ctx),
        **extra,
    )


def predict(loaded: LoadedModel, request: TaskRequest, ctx: JobContext, **extra: Any) -> list[Any]:
    options = request.options_as(YoloOptions)
    args = predict_args(loaded, options, ctx, **extra)
    with ctx.timings.measure("inference"), loaded.lock:
        return loaded.model.predict(source=[image.pixels for image in request.images], **args)


def half_precision(ctx: JobContext) -> dict[str, Any]:
    # Only named on CUDA: Ultralytics warns about the argument wherever it is given.
    if ctx.settings.half_precision and ctx.device.startswith("cuda"):
        return {"half": True}
    return {}


def to_detections(
    result: Any,
    names: dict[int, str],
    mask_format: str | None = None,
    kpt_names: tuple[str, ...] | None = None,
) -> list[Detection]:
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    xyxy = boxes.xyxy.cpu().numpy().astype(np.float64).round(2).tolist()
    confidences = boxes.conf.cpu().numpy().astype(np.float64).round(4).tolist()
    classes = boxes.cls.cpu().numpy().astype(int).tolist()
    track_ids = boxes.id.cpu().numpy().astype(int).tolist() if boxes.id is not None else None
    masks = None
    if mask_format and result.masks is not None:
        masks = result.masks.data.cpu().numpy() > 0.5
    keypoints = None
    if kpt_names is not None and result.keypoints is not None:
        keypoints = result.keypoints.data.cpu().numpy().astype(np.float64).round(2).tolist()
    detections = []
    for i, (box, confidence, class_id) in enumerate(zip(xyxy, confidences, classes, strict=True)):
        detection = Detection(
            box=box,
            confidence=confidence,
            class_id=class_id,
            label=names.get(class_id, str(class_id)),
            track_id=track_ids[i] if track_ids else None,
        )
        if masks is not None:
            detection.mask = encode_mask(masks[i], mask_format or "polygon")
        if keypoints is not None and kpt_names is not None:
            detection.keypoints = [
                Keypoint(name=kpt_names[k], x=x, y=y, confidence=c)
                for k, (x, y, c) in enumerate(keypoints[i])
            ]
        detections.append(detection)
    return detections


def image_results(
    results: list[Any],
    request: TaskRequest,
    ctx: JobContext,
    loaded: LoadedModel,
    mask_format: str | None = None,
    with_keypoints: bool = False,
) -> dict[str, Any]:
    names = class_names(loaded.model)
    out = []
    with ctx.timings.measure("encode"):
        for index, (result, image) in enumerate(zip(results, request.images, strict=True)):
            kpt_names = None
            if with_keypoints and result.keypoints is not None:
                kpt_names = keypoint_names(loaded.model, int(result.keypoints.data.shape[1]))
            out.append(
                ImageResult(
                    index=index,
                    width=image.width,
                    height=image.height,
                    detections=to_detections(result, names, mask_format, kpt_names),
                )
            )
    if request.annotate:
        with ctx.timings.measure("preview"):
            for item, result in zip(out, results, strict=True):
                result.names = names
                jpeg = image_to_jpeg(result.plot(line_width=None, pil=False))
                item.preview = ctx.store.put(f"preview_{item.index}.jpg", jpeg, "image/jpeg")
    return {"results": [item.model_dump(exclude_none=True) for item in out]}


def track_clip(
    loaded: LoadedModel, request: TaskRequest, ctx: JobContext, **extra: Any
) -> Generator[tuple[VideoFrame, Any], None, None]:
    """Each sampled frame with its `Results`, tracked across the clip when `options.track`.

    The model's lock is held for the whole clip: the tracker's state lives on the model's
    predictor, so two clips must not interleave. The first frame starts fresh trackers."""
    options = request.options_as(YoloOptions)
    args = predict_args(loaded, options, ctx, **extra)
    frames = iter_clip_frames(request, options, warnings=ctx.warnings)
    with loaded.lock:
        first = True
        while True:
            with ctx.timings.measure("decode"):
                frame = next(frames, None)
            if frame is None:
                return
            with ctx.timings.measure("inference"):
                if options.track:
                    tracker = f"{options.tracker}.yaml"
                    results = loaded.model.track(
                        frame.pixels, persist=not first, tracker=tracker, **args
                    )
                else:
                    results = loaded.model.predict(frame.pixels, **args)
            first = False
            yield frame, results[0]


def summarise_tracks(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per track id: label, first and last frame, how often seen, mean confidence."""
    tracks: dict[int, dict[str, Any]] = {}
    for frame in frames:
        for detection in frame["detections"]:
            track_id = detection.get("track_id")
            if track_id is None:
                continue
            entry = tracks.setdefault(
                track_id,
                {
                    "track_id": track_id,
                    "label": detection["label"],
                    "class_id": detection["class_id"],
                    "first_frame": frame["frame_index"],
                    "first_time_s": frame["time_s"],
                    "frames_seen": 0,
                    "_confidence": 0.0,
                },
            )
            entry["last_frame"] = frame["frame_index"]
            entry["last_time_s"] = frame["time_s"]
            entry["frames_seen"] += 1
            entry["_confidence"] += detection["confidence"]
    summary = []
    for entry in sorted(tracks.values(), key=lambda e: e["track_id"]):
        entry["mean_confidence"] = round(entry.pop("_confidence") / entry["frames_seen"], 4)
        summary.append(entry)
    return summary


def video_results(
    request: TaskRequest,
    ctx: JobContext,
    loaded: LoadedModel,
    mask_format: str | None = None,
    with_keypoints: bool = False,
    **predict_args: Any,
) -> dict[str, Any]:
    options = request.options_as(YoloOptions)
    info = clip_info(request)
    names = class_names(loaded.model)
    frames: list[dict[str, Any]] = []
    limit = options.max_frames
    annotator = ClipAnnotator(ctx, request.annotate, sample_rate(info.fps, options.fps))
    with annotator, closing(track_clip(loaded, request, ctx, **predict_args)) as tracked:
        for frame, result in tracked:
            kpt_names = None
            if with_keypoints and result.keypoints is not None:
                kpt_names = keypoint_names(loaded.model, int(result.keypoints.data.shape[1]))
            with ctx.timings.measure("encode"):
                detections = to_detections(result, names, mask_format, kpt_names)
            entries = [d.model_dump(exclude_none=True) for d in detections]
            frames.append({**frame_stamp(frame), "detections": entries})
            annotator.add(frame.pixels, frame.time_s, entries)
            ctx.progress.update(
                "inference",
                100 * len(frames) / limit,
                f"frame {len(frames)} (source {frame.index})",
            )
    output: dict[str, Any] = {
        "video": info.describe(options, len(frames)),
        "tracker": f"{options.tracker}.yaml" if options.track else None,
        "tracks": summarise_tracks(frames),
    }
    output.update(per_frame_output(ctx, frames))
    output.update(annotator.output())
    return output


def run_yolo_task(
    request: TaskRequest, ctx: JobContext, kind: str, **predict_args: Any
) -> dict[str, Any]:
    assert request.model is not None
    with ctx.timings.measure("load_model"):
        loaded = load_yolo(request.model, kind)
    mask_format = getattr(request.options, "mask_format", None) if kind == "segment" else None
    if is_clip(request):
        return video_results(
            request, ctx, loaded, mask_format, with_keypoints=kind == "pose", **predict_args
        )
    results = predict(loaded, request, ctx, **predict_args)
    return image_results(results, request, ctx, loaded, mask_format, with_keypoints=kind == "pose")


def preload_yolo(name: str, kind: str) -> LoadedModel:
    loaded = load_yolo(name, kind, pin=True)
    warm_up(loaded, worker_device())
    return loaded
