"""What this machine is: package versions and the accelerator, for each worker's `health`.

Shared by the infer worker's `health` task and the splat worker's, so the splat worker needs
no infer task for it (core.splat never imports core.tasks).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions(packages: Iterable[str]) -> dict[str, str]:
    """The installed version of each package that is installed."""
    return {p: v for p in packages if (v := package_version(p))}


def python_version() -> str:
    return platform.python_version()


def cuda_facts() -> dict[str, Any]:
    """`available` and, with a GPU, its `name`, CUDA `version`, `memory_total` (bytes) and
    `memory_gb`."""
    import torch

    cuda: dict[str, Any] = {"available": torch.cuda.is_available()}
    if cuda["available"]:
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        cuda.update(
            name=torch.cuda.get_device_name(index),
            version=torch.version.cuda,
            memory_total=total,
            memory_gb=round(total / 2**30, 1),
        )
    return cuda
