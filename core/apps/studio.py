"""Perception Concept Studio (repository `Mayakshanesht/perception-playground`, the commit whose
`backend/README.md` lists `sam3-concept-segmentation`).

Its proxy (`api/hf-inference.ts`) sends `{"task", "model", "payloadBase64", "mimeType",
"options"}` with a fixed model per task (`STUDIO_MODELS`) and `mimeType` often
`application/octet-stream`; its frontend (`src/components/Playground.tsx`) may also call the
backend directly with `image` / `video` beside `payloadBase64` and no `model`. The response is
what `Playground.tsx` reads, as its old backend (`backend/app/main.py`) made it:

- object-detection, image-segmentation, pose-estimation: a list of `{score, label, box {xmin,
  ymin, xmax, ymax}}` (plus `mask_polygon [[x, y], ...]`, `keypoints [[x, y, c], ...]`), pixels
  of the sent image;
- sam3-concept-segmentation: `{concepts, instances}` on an image; on a video `{concepts,
  annotated_video, content_type, metrics}` and no `instances` (the frontend's image branch
  would win);
- depth-estimation: `{depth_image}`, an 8-bit grey PNG (base64), min-max over the image,
  brighter nearer;
- velocity-estimation: `{annotated_video, content_type, velocity {fps, meter_per_pixel, mode,
  data [{frame_id, tracks}]}, metrics}`.

`"response_format": "native"` in the request returns our own result instead. The old
backend's routes (`POST /infer`, `GET /health`) are `routes()`, for the local server.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from core.apps.base import App, JobGateway, without
from core.contract import RequestAdapter
from core.media import VIDEO_TYPES, sniff_media_type
from core.storage import read_artifact
from core.system import cuda_facts

# The model its proxy sends per task (and its old backend's default when none is sent).
STUDIO_MODELS = {
    "object-detection": "yolo26n.pt",
    "image-segmentation": "yolo26n-seg.pt",
    "pose-estimation": "yolo26n-pose.pt",
    "sam3-concept-segmentation": "sam3.pt",
    "depth-estimation": "LiheYoung/depth-anything-small-hf",
    "velocity-estimation": "raft-large",
}
YOLO_TASKS = ("object-detection", "image-segmentation", "pose-estimation")
DEFAULT_CONCEPT = "person"  # the old backend's answer to an empty text_prompt
INFER_TIMEOUT_S = 600.0


def recognises(job_input: dict[str, Any]) -> bool:
    return "payloadBase64" in job_input


def _head_type(payload: Any) -> str | None:
    """The media type from the first bytes of the base64 payload (no full decode)."""
    if not isinstance(payload, str):
        return None
    head = "".join(payload[:96].split())
    head = head[: len(head) // 4 * 4]
    try:
        return sniff_media_type(base64.b64decode(head))
    except (binascii.Error, ValueError):
        return None


def to_native(job_input: dict[str, Any]) -> dict[str, Any]:
    task = job_input.get("task")
    native = without(job_input, "payloadBase64", "mimeType", "image", "video", "response_format")
    native["media"] = job_input["payloadBase64"]
    model = job_input.get("model") or STUDIO_MODELS.get(str(task))
    options = dict(job_input["options"]) if isinstance(job_input.get("options"), dict) else {}
    is_video = _head_type(job_input["payloadBase64"]) in VIDEO_TYPES
    if task == "velocity-estimation":
        # The Studio's one model is the flow model; the detector is our task's default.
        native.pop("model", None)
        options.setdefault("flow_model", model)
        native["annotate"] = True
    else:
        native["model"] = model
    if task == "sam3-concept-segmentation":
        prompt = options.pop("text", None)
        text = options.get("text_prompt") or prompt
        if not (isinstance(text, str | list) and text and str(text).strip()):
            options["text_prompt"] = DEFAULT_CONCEPT
        elif isinstance(text, str):
            options["text_prompt"] = text
        options.setdefault("mask_format", "polygon")
        if is_video:
            native["annotate"] = True
    if task == "image-segmentation":
        options.setdefault("mask_format", "polygon")
    if "options" in job_input or options:
        native["options"] = options
    return native


# --------------------------------------------------------------------------------------------
# Our result -> what the Studio reads


def shape_result(result: dict[str, Any], job_input: Any) -> Any:
    if isinstance(job_input, dict) and job_input.get("response_format") == "native":
        return result
    task = result.get("task")
    if task in YOLO_TASKS:
        return [_yolo_item(i, d, task) for i, d in enumerate(_first_detections(result))]
    if task == "sam3-concept-segmentation":
        if "results" in result:  # an image
            instances = result["results"][0]["detections"]
            items = [_yolo_item(i, d, "image-segmentation") for i, d in enumerate(instances)]
            return {"concepts": result["concepts"], "instances": items}
        frames = _frames(result)
        shaped = {"concepts": result["concepts"], **_video(result)}
        shaped["metrics"] = {
            "frames_processed": len(frames),
            "instances_detected_total": sum(len(f["detections"]) for f in frames),
        }
        return shaped
    if task == "depth-estimation":
        return {"depth_image": _depth_png8(result)}
    if task == "velocity-estimation":
        return _velocity(result)
    return result


def _first_detections(result: dict[str, Any]) -> list[dict[str, Any]]:
    if "results" in result:
        return list(result["results"][0]["detections"])
    frames = _frames(result)  # a clip: the first sampled frame, as the Studio sends images
    return list(frames[0]["detections"]) if frames else []


def _frames(result: dict[str, Any]) -> list[dict[str, Any]]:
    if "frames" in result:
        return list(result["frames"])
    stored = read_artifact(result["frames_artifact"])
    if stored is None:
        raise ValueError("the per-frame results went to S3; the Studio reads them inline")
    return list(json.loads(stored))


def _yolo_item(index: int, detection: dict[str, Any], task: str) -> dict[str, Any]:
    x1, y1, x2, y2 = detection["box"]
    box = {"xmin": x1, "ymin": y1, "xmax": x2, "ymax": y2}
    label, score = detection["label"], detection["confidence"]
    if task == "pose-estimation":
        item: dict[str, Any] = {"score": score, "label": label, "class_id": detection["class_id"]}
        item["box"] = box
        item["keypoints"] = [[k["x"], k["y"], k["confidence"]] for k in detection["keypoints"]]
        return item
    item = {
        "instance_id": index,
        "bbox": [x1, y1, x2, y2],
        "class_id": detection["class_id"],
        "class_name": label,
        "confidence": score,
        "label": label,
        "score": score,
        "box": box,
    }
    if detection.get("track_id") is not None:
        item["track_id"] = detection["track_id"]
    polygon = _largest_polygon(detection.get("mask"))
    if polygon:
        item["mask_polygon"] = polygon
        item["mask_area_px"] = round(_area(polygon))
    return item


def _largest_polygon(mask: dict[str, Any] | None) -> list[list[float]] | None:
    if not mask or mask.get("format") != "polygon" or not mask.get("polygons"):
        return None
    flat = max(mask["polygons"], key=lambda p: _area(list(zip(p[::2], p[1::2], strict=True))))
    points = [[float(x), float(y)] for x, y in zip(flat[::2], flat[1::2], strict=True)]
    return points if len(points) > 2 else None


def _area(points: Any) -> float:
    xs = np.array([p[0] for p in points], float)
    ys = np.array([p[1] for p in points], float)
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _depth_png8(result: dict[str, Any]) -> str:
    """Our 16-bit PNG (min-max over the image) as the old backend's 8-bit grey PNG."""
    from PIL import Image

    stored = read_artifact(result["results"][0]["depth"])
    if stored is None:
        raise ValueError("the depth map went to S3; the Studio reads it inline")
    levels = np.asarray(Image.open(io.BytesIO(stored)), dtype=np.uint16)
    out = io.BytesIO()
    Image.fromarray((levels >> 8).astype(np.uint8), mode="L").save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _video(result: dict[str, Any]) -> dict[str, Any]:
    record = result.get("annotated_video")
    if record is None:
        return {}
    stored = read_artifact(record)
    if stored is None:  # in S3: the Studio can play the presigned URL
        return {"annotated_video_url": record["url"], "content_type": record["content_type"]}
    content_type = record.get("content_type", "video/mp4")
    return {
        "annotated_video": base64.b64encode(stored).decode("ascii"),
        "content_type": content_type,
    }


def _velocity(result: dict[str, Any]) -> dict[str, Any]:
    fps = float(result["video"]["fps"])
    meter_per_pixel = float(result["meter_per_pixel"])
    data: list[dict[str, Any]] = []
    flows: list[float] = []
    speeds: list[float] = []
    for position, frame in enumerate(_frames(result)):
        tracks = []
        for track in frame["tracks"]:
            speed = track["speed_mps"]
            flow = None if speed is None else speed / meter_per_pixel / fps
            tracks.append(
                {
                    "track_id": track["track_id"] if track["track_id"] is not None else -1,
                    "class_name": track["label"],
                    "median_flow_px_per_frame": flow,
                    "speed_mps_est": speed,
                }
            )
            if speed is not None and flow is not None:
                flows.append(flow)
                speeds.append(speed)
        data.append({"frame_id": position, "tracks": tracks})
    mean_flow = float(np.mean(flows)) if flows else 0.0
    return {
        **_video(result),
        "velocity": {
            "fps": fps,
            "meter_per_pixel": meter_per_pixel,
            "mode": "per_track",
            "data": data,
        },
        "metrics": {
            "frames_processed": len(data),
            "mean_flow_px_per_frame": mean_flow,
            "mean_speed_mps_est": float(np.mean(speeds)) if speeds else 0.0,
        },
    }


# --------------------------------------------------------------------------------------------
# The old backend's HTTP contract, on the local server


def routes(gateway: JobGateway) -> APIRouter:
    router = APIRouter(tags=["Perception Concept Studio"])

    def failure(status: int, detail: str) -> JSONResponse:
        # `detail` as FastAPI's HTTPException; `error` too, which the frontend reads when it
        # calls this backend directly instead of through its proxy.
        return JSONResponse({"detail": detail, "error": detail}, status_code=status)

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "cuda": cuda_facts()["available"], "tasks": list(STUDIO_MODELS)}

    @router.post("/infer")
    async def infer(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return failure(
                422, "the body must be JSON: {task, model, payloadBase64, mimeType, options}"
            )
        if not isinstance(body, dict):
            return failure(422, "the body must be a JSON object")
        task = body.get("task")
        if task not in STUDIO_MODELS:
            supported = ", ".join(STUDIO_MODELS)
            return failure(400, f"Unsupported task: {task}. Supported tasks: {supported}")
        payload = body.get("payloadBase64")
        if not isinstance(payload, str) or len(payload) < 8:
            return failure(422, "payloadBase64: a base64 image or video is required")
        finished = await gateway.run_and_wait(body, INFER_TIMEOUT_S)
        if finished.status == "COMPLETED":
            return JSONResponse(_finite(finished.output))
        output = finished.output if isinstance(finished.output, dict) else {}
        detail = output.get("error_message") or finished.error or finished.status
        return failure(500, str(detail))

    return router


def _finite(value: Any) -> Any:
    """JSON has no NaN: the frontend's JSON.parse would fail on one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


APP = App(
    name="studio",
    title="Perception Concept Studio",
    worker="infer",
    recognises=recognises,
    adapter=RequestAdapter(to_native=to_native, shape_result=shape_result),
    routes=routes,
)
