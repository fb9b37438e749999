"""Error types with stable codes, and the one function that turns any exception into a result.

A handler never raises to the SDK: it returns `{"error": ..., "error_code": ...}`. The error
string starts with the code too, because RunPod shows only `error` for a FAILED job on some
routes; clients that read `error_code` get it without parsing.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

log = logging.getLogger("worker")

MAX_JSON_DEPTH = 64
"""No request of ours nests deeper; a deeper one is refused before it reaches any parser."""


class WorkerError(Exception):
    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(WorkerError):
    code = "invalid_input"


class UnsupportedTask(WorkerError):
    code = "unsupported_task"


class PayloadTooLarge(WorkerError):
    code = "payload_too_large"


class MediaDecodeFailed(WorkerError):
    code = "media_decode_failed"


class FetchFailed(WorkerError):
    code = "fetch_failed"


class ModelUnavailable(WorkerError):
    code = "model_unavailable"


class SfmFailed(WorkerError):
    code = "sfm_failed"


class UploadFailed(WorkerError):
    code = "upload_failed"


class Cancelled(WorkerError):
    code = "cancelled"


def describe_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line naming every bad field, e.g. `options.threshold: must be <= 1`."""
    parts = []
    for item in err.errors(include_url=False):
        loc = ".".join(str(p) for p in item["loc"] if p != "__root__")
        where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "input"
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def error_result(exc: BaseException, job_id: str | None = None) -> dict[str, Any]:
    """The job result for any exception; unexpected ones are logged with their traceback."""
    if isinstance(exc, ValidationError):
        exc = InvalidInput(describe_validation_error(exc))
    elif isinstance(exc, RecursionError):  # a JSON input nested thousands deep
        exc = InvalidInput(f"the input is nested too deeply (over {MAX_JSON_DEPTH} levels)")
    if isinstance(exc, WorkerError):
        log.warning("job %s failed: %s: %s", job_id, exc.code, exc.message)
        result: dict[str, Any] = {
            "error": f"{exc.code}: {exc.message}",
            "error_code": exc.code,
            "error_message": exc.message,
        }
        if exc.details:
            result["error_details"] = exc.details
        return result
    if isinstance(exc, MemoryError):
        log.exception("job %s ran out of memory", job_id)
        message = "the worker ran out of memory; send a smaller input or fewer images"
    else:
        log.exception("job %s failed with an unexpected error", job_id)
        message = f"unexpected {type(exc).__name__}; the worker logs have the traceback"
    return {"error": f"internal: {message}", "error_code": "internal", "error_message": message}
