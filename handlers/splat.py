"""RunPod serverless worker: video or photos -> camera poses -> 3D Gaussian splat (see README).
Logic lives in core/splat/."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.apps import run_splat
from core.models import require_usable_device
from core.worker import configure_logging, serverless_config

log = logging.getLogger("worker")


def handler(job: dict[str, Any]) -> Any:
    return run_splat(job)


def startup() -> None:
    """Everything before the first job (the local endpoint server, core.serve, calls it too)."""
    import pycolmap  # fail at start, not at the first job, if the SfM library is broken

    device = require_usable_device()  # DEVICE=cuda without a GPU: exit now, saying so
    log.info(
        "splat worker ready (device %s, pycolmap %s, SIFT on %s)",
        device,
        pycolmap.__version__,
        "CUDA" if pycolmap.has_cuda and device.startswith("cuda") else "CPU",
    )


def main() -> None:
    import runpod

    configure_logging()
    startup()
    runpod.serverless.start(serverless_config(handler))


if __name__ == "__main__":
    main()
