"""App contracts: each app that moved its backend onto our workers, in one module of its own.

An app module says how to recognise the app's request, how it becomes our job (`to_native`),
and how our result becomes the app's response (`shape_result`); `core/apps/base.py` has the
type. The workers stay app-agnostic: they take an adapter without knowing whose it is. The
handlers call `run_infer` / `run_splat` here, which pick the adapter for the job's shape.
"""

from __future__ import annotations

import logging
from typing import Any

from core.apps import gameview, orbit, splatt, studio, vfx
from core.apps.base import App, Worker
from core.progress import ProgressSink

# Checked in order; each recognises a shape the others do not send.
APPS: tuple[App, ...] = (studio.APP, orbit.APP, splatt.APP, gameview.APP, vfx.APP)

log = logging.getLogger("worker.apps")


def get_app(name: str) -> App:
    for app in APPS:
        if app.name == name:
            return app
    raise KeyError(f"unknown app {name!r}; known: {', '.join(a.name for a in APPS)}")


def recognise(worker: Worker, job_input: Any) -> App | None:
    """The app whose request shape `job_input` is, among those of `worker`; None for ours."""
    if not isinstance(job_input, dict):
        return None
    return next((a for a in APPS if a.worker == worker and a.recognises(job_input)), None)


def run_infer(job: dict[str, Any], sink: ProgressSink | None = None) -> Any:
    """An infer job in our shape or an app's; never raises."""
    from core.infer import run_infer_job

    app = recognise("infer", job.get("input"))
    output = run_infer_job(job, sink, app.adapter if app else None)
    if app is not None:
        finished(app, output, job.get("input"))
    return output


def run_splat(job: dict[str, Any], sink: ProgressSink | None = None, **kwargs: Any) -> Any:
    """A splat job in our shape or an app's; never raises."""
    from core.splat.pipeline import run_splat_job

    app = recognise("splat", job.get("input"))
    output = run_splat_job(job, sink, adapter=app.adapter if app else None, **kwargs)
    if app is not None:
        finished(app, output, job.get("input"))
    return output


def finished(app: App, output: Any, job_input: Any) -> None:
    """The app's `after_job` hook (its own callback), on success and failure alike; what
    it raises is logged, never the job's result."""
    if app.adapter.after_job is None:
        return
    try:
        app.adapter.after_job(output, job_input)
    except Exception:
        log.exception("%s: after_job failed", app.name)
