"""The worker shell both workers run each job in: the never-raise envelope and what every result
carries (`timings_ms`, `device`), the job's bucket, RESULT_PATH, and the log format.

`run_job(job, body)` calls `body(run)` with the job's settings, progress reporter and timings;
whatever `body` raises becomes an `error`/`error_code` result (`core/errors.py`), so a handler
never raises to the SDK and a bad job never takes the worker down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.config import Settings, get_settings
from core.contract import Timings
from core.errors import error_result
from core.models import worker_device
from core.progress import ProgressReporter, ProgressSink
from core.storage import BucketTarget

log = logging.getLogger("worker.jobs")


@dataclass(frozen=True)
class JobRun:
    """One job as the shell hands it to a worker's body."""

    job: dict[str, Any]
    settings: Settings
    progress: ProgressReporter
    timings: Timings

    @property
    def job_id(self) -> str:
        return str(self.job.get("id", "local"))

    def bucket(self) -> BucketTarget | None:
        """Where artifacts go: the job's own `s3Config`, else the BUCKET_* settings."""
        return BucketTarget.from_job(self.job.get("s3Config"), self.settings) or (
            BucketTarget.from_settings(self.settings)
        )


Shaper = Callable[[dict[str, Any], Any], Any]
"""(our successful result, the job's input) -> the response an app reads (any JSON)."""


def run_job(
    job: dict[str, Any],
    body: Callable[[JobRun], dict[str, Any]],
    sink: ProgressSink | None = None,
    shape: Shaper | None = None,
) -> Any:
    """Run `body` on one job; never raises. Errors come back as `error`/`error_code` results
    with the stage timings measured before the failure. `shape` turns a successful result,
    complete with `timings_ms` and `device`, into an app's response; an error result keeps
    our shape (RunPod marks a job FAILED by its `error`)."""
    settings = get_settings()
    started = time.perf_counter()
    run = JobRun(
        job, settings, ProgressReporter(job, sink, settings.progress_min_interval_s), Timings()
    )
    try:
        result = body(run)
    except Exception as exc:  # the one place every failure becomes a result
        result = error_result(exc, run.job_id)
        result["timings_ms"] = run.timings.as_dict()
    finally:
        run.progress.close()
    result.setdefault("timings_ms", {})["total"] = round((time.perf_counter() - started) * 1000, 2)
    result.setdefault("device", worker_device())
    output: Any = result
    if shape is not None and "error" not in result:
        try:
            output = shape(result, job.get("input"))
        except Exception as exc:  # a result the app cannot read is a failed job, not a crash
            output = {**error_result(exc, run.job_id), "timings_ms": result["timings_ms"]}
    if settings.result_path:
        write_result_file(settings, output)
    return output


def write_result_file(settings: Settings, result: Any) -> None:
    """RESULT_PATH: the whole result as JSON (the SDK's local log cuts it at 4 KB)."""
    try:
        path = settings.result_path
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    except OSError:
        log.exception("could not write RESULT_PATH")


def serverless_config(handler: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """What `runpod.serverless.start` takes. With MAX_CONCURRENCY > 1 the SDK is told so (its
    `concurrency_modifier`) and each job runs in a thread of its own: the SDK awaits handlers
    on one event loop, so a plain function would run its jobs one after another anyway."""
    concurrency = get_settings().max_concurrency
    if concurrency == 1:
        return {"handler": handler}

    async def concurrent_handler(job: dict[str, Any]) -> Any:
        return await asyncio.to_thread(handler, job)  # copies the context: job control too

    return {
        "handler": concurrent_handler,
        "concurrency_modifier": lambda _current: concurrency,
    }


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
