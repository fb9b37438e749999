"""RunPod serverless worker for perception jobs (see README). Logic lives in core/."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.apps import run_infer
from core.config import get_settings
from core.errors import WorkerError
from core.infer import preload
from core.models import require_usable_device
from core.tasks import load_all
from core.worker import configure_logging, serverless_config

log = logging.getLogger("worker")


def handler(job: dict[str, Any]) -> Any:
    return run_infer(job)


def startup() -> None:
    """Everything before the first job (the local endpoint server, core.serve, calls it too)."""
    started = time.perf_counter()
    spec = get_settings().preload_models
    # Imports torch now, not in the first job; DEVICE=cuda without a GPU exits here, saying so.
    log.info("device: %s", require_usable_device())
    load_all()
    try:
        models = preload(spec)
    except WorkerError as exc:
        log.error("PRELOAD_MODELS=%r failed, the worker will not start: %s", spec, exc.message)
        sys.exit(3)
    log.info(
        "ready in %.1f s with %d preloaded model(s): %s",
        time.perf_counter() - started,
        len(models),
        ", ".join(m["name"] for m in models) or "none",
    )


def main() -> None:
    import runpod

    configure_logging()
    startup()
    runpod.serverless.start(serverless_config(handler))


if __name__ == "__main__":
    main()
