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


@dataclass(frozen=True)
class JobView:
    """One job of the local server as an app's routes read it, at any point of its life."""

    id: str
    status: str
    """RunPod's: IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT."""
    input: Any
    progress: dict[str, Any] | None
    """The latest progress update (`stage`, `progress` 0-100 within it, `message`, ...)."""
    output: Any
    """The handler's result once ended (without `error`, which is `error`)."""
    error: str | None
    created_at: float
    updated_at: float
    """Epoch seconds of the last change: queued, started, progress, ended."""


class JobGateway(Protocol):
    """What the local server offers an app's routes: its jobs, without its internals (apps sit
    below the server and never import it)."""

    async def run_and_wait(self, job_input: dict[str, Any], timeout_s: float) -> FinishedJob:
        """Queue a job like /runsync and wait for its end (or the timeout)."""
        ...

    def submit(self, job_input: dict[str, Any]) -> str:
        """Queue a job like /run; its id."""
        ...

    def job(self, job_id: str) -> JobView | None:
        """The job's state, progress and output; None when unknown, deleted or expired."""
        ...

    def list_jobs(self, limit: int, offset: int = 0) -> tuple[list[JobView], int]:
        """Jobs newest first, and how many there are in all."""
        ...

    def cancel(self, job_id: str) -> JobView | None:
        """Cancel like RunPod's /cancel (a running job is told to stop and its slot frees once
        it does); the job as it is now, or None if unknown."""
        ...

    def delete(self, job_id: str) -> JobView | None:
        """Forget the job (a running one is told to stop); what it was, or None if unknown.
        Files it stored are the app's to remove."""
        ...

    def counts(self) -> dict[str, int]:
        """Jobs per RunPod state (IN_QUEUE, IN_PROGRESS, COMPLETED, ...)."""
        ...

    def api_key(self) -> str | None:
        """The key the server itself requires (SERVE_API_KEY), for routes that check their
        own header; None when it requires none."""
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
