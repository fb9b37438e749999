"""What an app contract is: how to recognise its request, the adapter that serves it, and (for
the local server) its own HTTP routes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from core.contract import RequestAdapter

if TYPE_CHECKING:
    from fastapi import APIRouter

Worker = Literal["infer", "splat"]


@dataclass(frozen=True)
class FinishedJob:
    """A job run to its end by the local server, as an app's route sees it."""

    id: str
    status: str
    """RunPod's: COMPLETED, FAILED, CANCELLED, TIMED_OUT (or IN_QUEUE/IN_PROGRESS if the wait
    ran out)."""
    output: Any
    """The handler's result: the app's response when the job completed."""
    error: str | None


class JobGateway(Protocol):
    """What the local server offers an app's routes: its jobs, without its internals (apps sit
    below the server and never import it)."""

    async def run_and_wait(self, job_input: dict[str, Any], timeout_s: float) -> FinishedJob:
        """Queue a job like /runsync and wait for its end (or the timeout)."""
        ...

    def device_facts(self) -> dict[str, Any]:
        """`cuda` (bool) and, when there is one, the GPU's `name` and `memory_total`."""
        ...


RoutesFactory = Callable[[JobGateway], "APIRouter"]


@dataclass(frozen=True)
class App:
    name: str
    """The name `python -m core.serve HANDLER --app NAME` takes (`studio`, `orbit`, ...)."""
    title: str
    worker: Worker
    """The worker whose jobs the app sends."""
    recognises: Callable[[dict[str, Any]], bool]
    """True for a job input in this app's shape (checked before any validation)."""
    adapter: RequestAdapter
    routes: RoutesFactory | None = None
    """The app's old backend's HTTP routes, served beside RunPod's by the local server."""


def without(source: dict[str, Any], *names: str) -> dict[str, Any]:
    """A copy of `source` without `names` (the app's own fields, once translated)."""
    return {key: value for key, value in source.items() if key not in names}
