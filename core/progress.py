"""Throttled progress reporting to the job: on a stage change, else at most once per interval.

On RunPod the updates go through `runpod.serverless.progress_update` (looked up at call time,
so a local server can stand in for it); where a job control is bound (`core/control.py`, set
by the local endpoint server) they go to its callback, the job's /status; elsewhere they are
logged. Nothing is sent after `close()`, which the runner calls before the job returns.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from core import control as job_control

log = logging.getLogger("worker.progress")

ProgressSink = Callable[[dict[str, Any], dict[str, Any]], None]


def runpod_sink(job: dict[str, Any], update: dict[str, Any]) -> None:
    import runpod.serverless

    runpod.serverless.progress_update(job, update)


def log_sink(job: dict[str, Any], update: dict[str, Any]) -> None:
    log.info("job %s progress: %s", job.get("id"), update)


def default_sink() -> ProgressSink:
    # A bound job control (the local endpoint server sets one) receives the updates.
    control = job_control.current()
    if control is not None:
        return control.report_progress
    # The SDK's update posts to RunPod's job API; with no API (local runs) it would only fail.
    return runpod_sink if os.environ.get("RUNPOD_WEBHOOK_GET_JOB") else log_sink


class ProgressReporter:
    def __init__(
        self,
        job: dict[str, Any],
        sink: ProgressSink | None = None,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.sink = sink or default_sink()
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._stage: str | None = None
        self._last_sent = float("-inf")
        self._closed = False
        self._lock = threading.Lock()

    def update(
        self, stage: str, progress: float, message: str = "", *, force: bool = False, **extra: Any
    ) -> bool:
        """Report; returns whether the update was sent (not throttled). `force` skips the
        throttle, for the few updates a client must see (a stage's final numbers)."""
        with self._lock:
            if self._closed:
                return False
            now = self.clock()
            throttled = stage == self._stage and now - self._last_sent < self.min_interval_s
            if throttled and not force:
                return False
            self._stage, self._last_sent = stage, now
        update = {"stage": stage, "progress": round(max(0.0, min(100.0, progress)), 1)}
        if message:
            update["message"] = message
        update.update(extra)
        try:
            self.sink(self.job, update)
        except Exception:  # progress must never fail a job
            log.exception("progress update failed")
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True


class StagedProgress:
    """One job of several stages, reported as one: each stage owns a span of 0-100 and its
    updates are mapped into it, so the job's progress runs once from 0 to 100 (never back)
    while `stage` names the stage at work. `reporter_for` hands a stage a `ProgressReporter`
    (for code that reports with its own stage names, such as SAM 2's `propagating`);
    `callback_for` a `(fraction, message)` callable for the stages in `core/stages/`."""

    def __init__(self, reporter: ProgressReporter, spans: dict[str, tuple[float, float]]) -> None:
        self.reporter = reporter
        self.spans = spans
        self._high = 0.0
        self._lock = threading.Lock()

    def report(
        self, stage: str, fraction: float, message: str = "", *, force: bool = False
    ) -> None:
        lo, hi = self.spans[stage]
        overall = lo + (hi - lo) * max(0.0, min(1.0, fraction))
        with self._lock:
            self._high = max(self._high, overall)
            overall = self._high
        self.reporter.update(stage, overall, message, force=force)

    def start(self, stage: str, message: str) -> None:
        self.report(stage, 0.0, message, force=True)

    def callback_for(self, stage: str) -> Callable[[float, str], None]:
        def callback(fraction: float, message: str = "") -> None:
            self.report(stage, fraction, message)

        return callback

    def reporter_for(self, stage: str) -> ProgressReporter:
        return CallbackReporter(self.callback_for(stage))


class CallbackReporter(ProgressReporter):
    """A `ProgressReporter` for code that reports 0-100 under its own stage names (SAM 2's
    `propagating`, `run_sfm`'s steps): each update goes to `callback(fraction, message)`
    at once, unthrottled, and what the callback raises propagates (unlike a sink's errors),
    so a callback may stop the work (raise `Cancelled`)."""

    def __init__(self, callback: Callable[[float, str], None]) -> None:
        super().__init__({}, sink=lambda job, update: None, min_interval_s=0.0)
        self.callback = callback

    def update(
        self, stage: str, progress: float, message: str = "", *, force: bool = False, **extra: Any
    ) -> bool:
        self.callback(max(0.0, min(1.0, progress / 100.0)), message)
        return True
