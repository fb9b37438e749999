"""object-detection: Ultralytics YOLO boxes with class labels."""

from __future__ import annotations

from typing import Any

from core.contract import JobContext, TaskRequest
from core.models import LoadedModel
from core.schemas import DetectionOptions
from core.tasks import Task, register
from core.tasks._yolo import preload_yolo, run_yolo_task


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    return run_yolo_task(request, ctx, "detect")


def load(name: str) -> LoadedModel:
    return preload_yolo(name, "detect")


TASK = register(
    Task(
        name="object-detection",
        options=DetectionOptions,
        run=run,
        media=frozenset({"image", "video"}),
        default_model="yolo11n.pt",
        load=load,
        description="boxes, confidences and class labels per image",
    )
)
