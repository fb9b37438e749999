"""The HTTP side: RunPod's endpoint routes, at `/` and under `/{endpoint_id}/` (so RunPod's own
clients work by changing only their base URL), plus `/jobs` for self-hosting apps.

Errors are `{"error": "<one line>"}` with a 4xx: 400 for a malformed body or bad field, 401
for a wrong or missing API key, 404 for an unknown (or expired) job, 409 for a request that
does not fit the job's state, 413 for a body over the /run or /runsync limit.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.apps.base import App, FinishedJob, JobView
from core.errors import MAX_JSON_DEPTH, describe_validation_error
from core.serve.runner import JobConflict, Runner
from core.serve.settings import ServeSettings
from core.serve.store import (
    ALL_STATES,
    IN_PROGRESS,
    IN_QUEUE,
    JobRecord,
    compact_json,
    status_json,
)

WEEK_MS = 7 * 24 * 3600 * 1000  # RunPod's limit for executionTimeout and ttl


class ApiError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class Policy(BaseModel):
    model_config = ConfigDict(extra="ignore")

    executionTimeout: int | None = Field(default=None, gt=0, le=WEEK_MS)
    ttl: int | None = Field(default=None, ge=10_000, le=WEEK_MS)
    lowPriority: bool = False  # accepted; one local queue has no scaling to spare


class JobRequest(BaseModel):
    """The body of /run and /runsync, as RunPod takes it."""

    model_config = ConfigDict(extra="ignore")

    input: dict[str, Any]
    webhook: AnyHttpUrl | None = None
    policy: Policy | None = None
    s3Config: dict[str, Any] | None = None


class Gateway:
    """The local server's jobs as an app's routes use them (`core.apps.base.JobGateway`)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def run_and_wait(self, job_input: dict[str, Any], timeout_s: float) -> FinishedJob:
        record = self.runner.submit(job_input, sync=True)
        clock = asyncio.get_running_loop().time
        deadline = clock() + timeout_s
        watch = _Watch(self.runner, record.id)
        try:
            current = self.runner.store.get(record.id)
            while current is not None and not current.final and clock() < deadline:
                await watch.wait(deadline - clock())
                current = self.runner.store.get(record.id)
        finally:
            watch.close()
        current = current or record
        output = json.loads(current.output_json) if current.output_json else None
        return FinishedJob(current.id, current.status, output, current.error)

    def submit(self, job_input: dict[str, Any]) -> str:
        return self.runner.submit(job_input).id

    def job(self, job_id: str) -> JobView | None:
        record = self.runner.store.get(job_id)
        return None if record is None else self._view(record)

    def list_jobs(self, limit: int, offset: int = 0) -> tuple[list[JobView], int]:
        records, total = self.runner.store.list_jobs(ALL_STATES, limit, offset)
        return [self._view(r) for r in records], total

    def cancel(self, job_id: str) -> JobView | None:
        record = self.runner.cancel(job_id)
        return None if record is None else self._view(record)

    def delete(self, job_id: str) -> JobView | None:
        record = self.runner.delete(job_id)
        return None if record is None else self._view(record)

    def counts(self) -> dict[str, int]:
        return self.runner.store.counts()

    def api_key(self) -> str | None:
        key = self.runner.settings.api_key
        return key.get_secret_value() if key else None

    def _view(self, record: JobRecord) -> JobView:
        times = [record.created_at, record.started_at, record.finished_at]
        times.append(self.runner.progress_time(record.id))
        progress = json.loads(record.progress_json) if record.progress_json else None
        return JobView(
            id=record.id,
            status=record.status,
            input=json.loads(record.input_json),
            progress=progress if isinstance(progress, dict) else None,
            output=json.loads(record.output_json) if record.output_json else None,
            error=record.error,
            created_at=record.created_at,
            updated_at=max(t for t in times if t is not None),
        )


def create_app(runner: Runner, settings: ServeSettings, app_contract: App | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.stop)

    app = FastAPI(
        title="Local RunPod endpoint",
        summary="RunPod's serverless endpoint API, served from this machine",
        lifespan=lifespan,
    )
    app.state.runner = runner
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item.get("loc", ()))
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):  # an app's route, in its backend's own error shape
            return JSONResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    router = APIRouter(dependencies=[Depends(_api_key_check(settings))])
    _add_routes(router, runner, settings)
    if app_contract is not None and app_contract.routes is not None:
        # The app's old backend's routes, first: they answer as that backend did, with its own
        # authentication (or none), beside RunPod's.
        app.include_router(app_contract.routes(Gateway(runner)))
    app.include_router(router)
    # RunPod's URL shape, `{base}/{endpoint_id}/run`: any endpoint id reaches this server.
    app.include_router(router, prefix="/{endpoint_id}", include_in_schema=False)
    return app


def _api_key_check(settings: ServeSettings) -> Any:
    expected = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        # RunPod takes `Bearer <key>` and the bare key alike.
        key = credentials.strip() if scheme.lower() == "bearer" else given.strip()
        if not key:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <SERVE_API_KEY>`")
        if not secrets.compare_digest(key.encode(), expected):
            raise ApiError(401, "wrong API key")

    return check


_JSON_STRUCTURE = re.compile(rb'["\[\]{}]')


def json_depth(body: bytes) -> int:
    """How deep a JSON text's arrays and objects nest, counted without parsing it (Python's
    parser recurses, and a body nested 100,000 deep would exhaust the stack). Strings are
    skipped whole (a base64 image is one `find`), so brackets inside them do not count."""
    depth = deepest = position = 0
    while (found := _JSON_STRUCTURE.search(body, position)) is not None:
        char, position = body[found.start()], found.end()
        if char == 0x22:  # a string: to its closing quote, one not escaped by a backslash
            while (position := body.find(b'"', position)) >= 0:
                before = position - 1
                while before >= 0 and body[before] == 0x5C:  # backslashes before the quote
                    before -= 1
                position += 1
                if (position - 2 - before) % 2 == 0:
                    break
            if position < 0:
                return deepest  # unterminated: the JSON parser says so
        elif char in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _json(text: str, status_code: int = 200) -> Response:
    return Response(text, status_code=status_code, media_type="application/json")


def _find(runner: Runner, job_id: str) -> JobRecord:
    record = runner.store.get(job_id)
    if record is None:
        raise ApiError(404, f"job {job_id} not found (unknown, deleted, or its result expired)")
    return record


async def _read_job_request(request: Request, limit: int, settings: ServeSettings) -> JobRequest:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared)} bytes; this route takes {limit} at most")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body is over {limit} bytes, this route's limit")
    if not body.strip():
        raise ApiError(400, 'the body must be JSON like {"input": {...}}')
    depth = json_depth(bytes(body))
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the body nests {depth} levels deep; at most {MAX_JSON_DEPTH}")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
    try:
        job = JobRequest.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, describe_validation_error(exc, prefix="body.")) from exc
    timeout = job.policy.executionTimeout if job.policy else None
    if timeout is not None and timeout < settings.min_execution_timeout_ms:
        raise ApiError(
            400,
            f"body.policy.executionTimeout: {timeout} ms is under the "
            f"{settings.min_execution_timeout_ms} ms minimum",
        )
    return job


class _Watch:
    """Wakes an async route when the runner reports a change to one job (progress, a stream
    chunk, the end). Registered before the route reads the job, so no change is missed."""

    def __init__(self, runner: Runner, job_id: str) -> None:
        self.runner, self.job_id = runner, job_id
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()
        self.token = runner.watch(job_id, self._wake)

    def _wake(self) -> None:
        with suppress(RuntimeError):  # the loop closed (shutdown)
            self.loop.call_soon_threadsafe(self.changed.set)

    async def wait(self, timeout: float) -> None:
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)
        self.changed.clear()

    def close(self) -> None:
        self.runner.unwatch(self.job_id, self.token)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def _summary(record: JobRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": record.id,
        "status": record.status,
        "route": "runsync" if record.sync else "run",
        "createdAt": _iso(record.created_at),
        "startedAt": _iso(record.started_at),
        "completedAt": _iso(record.finished_at),
        "expiresAt": _iso(record.expires_at),
        "attempts": record.attempts,
        "workerId": record.worker_id,
    }
    if record.started_at is not None:
        item["delayTime"] = round((record.started_at - record.created_at) * 1000)
        if record.finished_at is not None:
            item["executionTime"] = round((record.finished_at - record.started_at) * 1000)
    if record.error is not None:
        item["error"] = record.error
    if record.webhook:
        item["webhook"] = {"url": record.webhook, "state": record.webhook_state}
    return item


def _add_routes(router: APIRouter, runner: Runner, settings: ServeSettings) -> None:
    def submit(job: JobRequest, sync: bool) -> JobRecord:
        policy = job.policy or Policy()
        return runner.submit(
            job.input,
            sync=sync,
            webhook=str(job.webhook) if job.webhook else None,
            s3_config=job.s3Config,
            execution_timeout_ms=policy.executionTimeout,
            ttl_ms=policy.ttl,
        )

    @router.post("/run")
    async def run(request: Request) -> Response:
        job = await _read_job_request(request, settings.max_run_bytes, settings)
        record = submit(job, sync=False)
        return _json(compact_json({"id": record.id, "status": IN_QUEUE}))

    @router.post("/runsync")
    async def runsync(
        request: Request,
        wait: Annotated[int | None, Query(ge=1000, le=300_000, description="ms to wait")] = None,
    ) -> Response:
        job = await _read_job_request(request, settings.max_runsync_bytes, settings)
        record = submit(job, sync=True)
        clock = asyncio.get_running_loop().time
        deadline = clock() + (wait / 1000 if wait else settings.runsync_wait_s)
        watch = _Watch(runner, record.id)
        try:
            current = runner.store.get(record.id)
            while current is not None and not current.final and clock() < deadline:
                await watch.wait(deadline - clock())
                current = runner.store.get(record.id)
        finally:
            watch.close()
        # As RunPod: the final result, or the job still queued/running for the client to poll.
        return _json(status_json(current or record))

    @router.get("/status/{job_id}")
    @router.post("/status/{job_id}")
    async def status(job_id: str) -> Response:
        return _json(status_json(_find(runner, job_id)))

    @router.get("/stream/{job_id}")
    @router.post("/stream/{job_id}")
    async def stream(job_id: str) -> Response:
        """The chunks not handed out yet (each once, as RunPod); waits a little for one."""
        _find(runner, job_id)
        watch = _Watch(runner, job_id)
        try:
            record, chunks = runner.store.take_stream(job_id)
            if record is not None and not chunks and not record.final:
                await watch.wait(settings.stream_wait_s)
                record, chunks = runner.store.take_stream(job_id)
        finally:
            watch.close()
        if record is None:  # deleted meanwhile
            raise ApiError(404, f"job {job_id} not found (deleted)")
        head: dict[str, Any] = {"id": record.id, "status": record.status}
        if record.error is not None:
            head["error"] = record.error
        items = ",".join(f'{{"output":{chunk}}}' for chunk in chunks)
        return _json(f'{compact_json(head)[:-1]},"stream":[{items}]}}')

    @router.post("/cancel/{job_id}")
    async def cancel(job_id: str) -> Response:
        record = runner.cancel(job_id)
        if record is None:
            _find(runner, job_id)
        assert record is not None
        return _json(compact_json({"id": record.id, "status": record.status}))

    @router.post("/retry/{job_id}")
    async def retry(job_id: str) -> Response:
        try:
            record = runner.retry(job_id)
        except JobConflict as exc:
            raise ApiError(409, str(exc)) from exc
        if record is None:
            _find(runner, job_id)
        assert record is not None
        return _json(compact_json({"id": record.id, "status": record.status}))

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return runner.health()

    @router.post("/purge-queue")
    async def purge_queue() -> dict[str, Any]:
        return {"removed": runner.purge_queue(), "status": "completed"}

    @router.get("/jobs")
    async def list_jobs(
        status: Annotated[str | None, Query(description="comma-separated states")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        wanted = [s.strip().upper() for s in status.split(",") if s.strip()] if status else []
        unknown = sorted(set(wanted) - set(ALL_STATES))
        if unknown:
            raise ApiError(400, f"status: unknown state(s) {unknown}; use {list(ALL_STATES)}")
        records, total = runner.store.list_jobs(wanted or ALL_STATES, limit, offset)
        return {
            "jobs": [_summary(r) for r in records],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @router.delete("/jobs/{job_id}")
    async def delete_job(job_id: str) -> dict[str, Any]:
        record = runner.delete(job_id)
        if record is None:
            _find(runner, job_id)
        assert record is not None
        stopped = record.status == IN_PROGRESS
        return {"id": record.id, "status": record.status, "deleted": True, "stopped": stopped}
