"""Per-job control signals: stop (cancel, execution timeout) and where progress goes.

Whatever runs a job (the local endpoint server, `core/serve/`, today) binds a `JobControl`
to the running thread's context for the job's duration. Code deep inside a job (progress
reporting, video loops, the splat training loop) consults it without the handler passing
anything along, so the handlers keep RunPod's one-argument `handler(job)` shape and nothing
below `core/serve/` imports the server. Outside a binding every function here is a no-op.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

ProgressCallback = Callable[[dict[str, Any], Any], None]


@dataclass
class JobControl:
    job_id: str
    report_progress: ProgressCallback
    """Called as `runpod.serverless.progress_update(job, update)` is: lands in /status."""
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # "cancelled" or "timed_out", set with `stop`

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()


_current: ContextVar[JobControl | None] = ContextVar("job_control", default=None)


def current() -> JobControl | None:
    """The control bound to the job this thread runs, if any."""
    return _current.get()


def cancel_requested() -> bool:
    """True once whatever runs the current job asked it to stop (cancel or execution timeout)."""
    control = _current.get()
    return control is not None and control.stop.is_set()


# Every job running in this process by id, for `runpod.serverless.progress_update(job, ...)`
# calls that come from a thread of the handler's own (where the context var is not set).
_running: dict[str, JobControl] = {}
_running_lock = threading.Lock()


def running(job_id: str) -> JobControl | None:
    with _running_lock:
        return _running.get(job_id)


@contextmanager
def bind(control: JobControl) -> Iterator[JobControl]:
    """The control is current in this thread, and findable by job id, while the job runs."""
    token = _current.set(control)
    with _running_lock:
        _running[control.job_id] = control
    try:
        yield control
    finally:
        with _running_lock:
            if _running.get(control.job_id) is control:
                del _running[control.job_id]
        _current.reset(token)
