"""image-segmentation: Ultralytics YOLO instance masks as polygons, COCO RLE or PNG."""

from __future__ import annotations

from typing import Any

from core.contract import JobContext, TaskRequest
from core.models import LoadedModel
from core.schemas import SegmentationOptions
from core.tasks import Task, register
from core.tasks._yolo import preload_yolo, run_yolo_task


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    # retina_masks: masks at the original resolution, so RLE and polygons are pixel-exact.
    return run_yolo_task(request, ctx, "segment", retina_masks=True)


def load(name: str) -> LoadedModel:
    return preload_yolo(name, "segment")


TASK = register(
    Task(
        name="image-segmentation",
        options=SegmentationOptions,
        run=run,
        media=frozenset({"image", "video"}),
        default_model="yolo11n-seg.pt",
        load=load,
        description="instance masks (polygon, rle or png) with boxes and labels",
    )
)
