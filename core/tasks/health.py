"""health: versions, device, loaded models and the effective limits; needs no media."""

from __future__ import annotations

from typing import Any

from core.contract import JobContext, TaskRequest
from core.models import get_registry
from core.schemas import HealthOptions
from core.system import cuda_facts, python_version, versions
from core.tasks import Task, load_all, register

PACKAGES = (
    "runpod",
    "torch",
    "torchvision",
    "ultralytics",
    "opencv-python-headless",
    "av",
    "pycocotools",
    "pydantic",
    "boto3",
)


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    cuda = cuda_facts()
    cuda.pop("memory_total", None)  # this task's shape: memory_gb
    settings = ctx.settings
    return {
        "status": "ok",
        "python": python_version(),
        "versions": versions(PACKAGES),
        "cuda": cuda,
        "loaded_models": get_registry().loaded(),
        "tasks": sorted(load_all()),
        "storage": ctx.store.mode,
        "limits": {
            "max_input_bytes": settings.max_input_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_batch_images": settings.max_batch_images,
            "inline_max_bytes": settings.inline_max_bytes,
        },
    }


TASK = register(Task(name="health", options=HealthOptions, run=run))
