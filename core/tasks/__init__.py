"""Task registry. A task is one module here plus its options schema; it registers itself.

Every module in this package is imported by `load_all()`, so adding a task touches nothing
else: write `core/tasks/<name>.py` calling `register(Task(...))`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.errors import UnsupportedTask

if TYPE_CHECKING:
    from core.contract import JobContext, TaskRequest
    from core.models import LoadedModel
    from core.schemas import TaskOptions


@dataclass(frozen=True)
class Task:
    name: str
    options: type[TaskOptions]
    run: Callable[[TaskRequest, JobContext], dict[str, Any]]
    media: frozenset[str] = field(default_factory=frozenset)
    """What it takes: {"image"}, {"image", "video"}, or nothing (health)."""
    default_model: str | None = None
    load: Callable[[str], LoadedModel] | None = None
    """Loads (and pins) a model by name; used by PRELOAD_MODELS."""
    description: str = ""


_TASKS: dict[str, Task] = {}
_loaded = False


def register(task: Task) -> Task:
    if task.name in _TASKS:
        raise RuntimeError(f"task {task.name} registered twice")
    _TASKS[task.name] = task
    return task


def load_all() -> dict[str, Task]:
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return _TASKS


def get_task(name: str) -> Task:
    tasks = load_all()
    if name not in tasks:
        raise UnsupportedTask(f"unknown task {name!r}; available: {', '.join(sorted(tasks))}")
    return tasks[name]
