"""The task contract: what a task receives (`TaskRequest`) and what it may use (`JobContext`).

`core/tasks/*` import this module, never the runner that builds these objects (`core/infer.py`),
so the registry, the tasks and the runner form no import circle. A task may use everything on
the context: the settings, the job's artifact store, progress, the device, timings and
warnings; cancel comes through `core/control.py` (the video helpers check it between frames).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from core.config import Settings
from core.media import DecodedImage, ImageFrames
from core.payload import Payload
from core.progress import ProgressReporter
from core.schemas import TaskOptions
from core.storage import ArtifactStore

OptionsT = TypeVar("OptionsT", bound=TaskOptions)


class Timings:
    """Milliseconds per stage, summed over repeats; thread-safe (tasks measure in pools)."""

    def __init__(self) -> None:
        self._ms: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - started) * 1000)

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._ms[stage] = self._ms.get(stage, 0.0) + ms

    def as_dict(self) -> dict[str, float]:
        return {stage: round(ms, 2) for stage, ms in self._ms.items()}


@dataclass
class JobContext:
    job: dict[str, Any]
    settings: Settings
    store: ArtifactStore
    progress: ProgressReporter
    device: str
    timings: Timings = field(default_factory=Timings)
    warnings: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return str(self.job.get("id", "local"))


@dataclass
class TaskRequest:
    task: str
    model: str | None
    options: TaskOptions
    annotate: bool = False
    images: list[DecodedImage] = field(default_factory=list)
    video: Payload | None = None
    frames: ImageFrames | None = None
    """A clip sent as images (`frames`), in order, each decoded when read (`frames[i]`, or
    `core/video.iter_clip_frames`); `frames_fps` is its rate."""
    frames_fps: float | None = None

    def options_as(self, kind: type[OptionsT]) -> OptionsT:
        """The parsed options as the task's own type (the registry parsed them with it)."""
        if not isinstance(self.options, kind):
            raise TypeError(f"{self.task}: options are {type(self.options).__name__}, not {kind}")
        return self.options


def _result_unchanged(result: dict[str, Any], app_input: Any) -> Any:
    return result


@dataclass(frozen=True)
class RequestAdapter:
    """How a request in another app's shape becomes one of ours, and our result its response.

    The workers take one (`core/apps/` builds them) without knowing which app it serves:
    `to_native` maps the app's input to our input (validating what only the app has),
    `shape_result` turns a successful result into what the app reads, any JSON (the worker
    shell applies it last; errors keep our `error`/`error_code` shape, which RunPod needs to
    mark a job FAILED), and `run_task`, for the infer worker, replaces the task's own `run`
    when the app's job is more than one task; `after_job` runs once the job has ended, on
    success and failure alike (`core/apps/__init__.py` calls it).
    """

    to_native: Callable[[dict[str, Any]], dict[str, Any]]
    shape_result: Callable[[dict[str, Any], Any], Any] = _result_unchanged
    run_task: Callable[[dict[str, Any], TaskRequest, JobContext], dict[str, Any]] | None = None
    after_job: Callable[[Any, Any], None] | None = None
    """(the job's final output, success or error, the job's input): runs after every job
    of the app whatever its outcome (an app's own callback); it must not raise."""
