"""health: versions, device, loaded models and the effective limits; needs no media."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from core.contract import JobContext, TaskRequest
from core.models import get_registry
from core.schemas import HealthOptions
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


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    import torch

    cuda: dict[str, Any] = {"available": torch.cuda.is_available()}
    if cuda["available"]:
        index = torch.cuda.current_device()
        cuda.update(
            name=torch.cuda.get_device_name(index),
            version=torch.version.cuda,
            memory_gb=round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
        )
    settings = ctx.settings
    return {
        "status": "ok",
        "python": platform.python_version(),
        "versions": {p: v for p in PACKAGES if (v := _version(p))},
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
