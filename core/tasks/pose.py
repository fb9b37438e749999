"""pose-estimation: Ultralytics YOLO pose, 17 named COCO keypoints per person."""

from __future__ import annotations

from typing import Any

from core.contract import JobContext, TaskRequest
from core.models import LoadedModel
from core.schemas import PoseOptions
from core.tasks import Task, register
from core.tasks._yolo import preload_yolo, run_yolo_task


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    return run_yolo_task(request, ctx, "pose")


def load(name: str) -> LoadedModel:
    return preload_yolo(name, "pose")


TASK = register(
    Task(
        name="pose-estimation",
        options=PoseOptions,
        run=run,
        media=frozenset({"image", "video"}),
        default_model="yolo11n-pose.pt",
        load=load,
        description="people with 17 COCO keypoints (name, x, y, confidence)",
    )
)
