"""Runs the queued jobs: N worker threads beside the preloaded models, a monitor, webhooks.

A worker thread claims the oldest queued job from the store, binds the job's `JobControl`
(core/control.py) and calls the handler as RunPod's SDK does: a plain function, a
coroutine, a generator or an async generator (each yield is a /stream chunk). The result
becomes COMPLETED or FAILED by the SDK's rules (a dict's `error` key fails the job).

Cancel and execution timeout end the job at once (CANCELLED, TIMED_OUT) and set the job's
stop signal: generator handlers stop at their next yield, the splat pipeline at its next
training step. Python cannot kill a thread, so a handler that never looks at the signal
runs to its end; its slot stays busy meanwhile (`/health` says `stopping`) and its result is
dropped. Every state change is a conditional store update: whichever of "finished",
"cancelled", "timed out" comes first wins, and the job is never run twice.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass
from typing import Any

from core import control as context
from core.config import get_settings
from core.errors import FetchFailed, InvalidInput
from core.netguard import CERTIFICATE_ERRORS, NETWORK_ERRORS, describe, post_once
from core.serve.settings import ServeSettings
from core.serve.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    IN_QUEUE,
    TIMED_OUT,
    JobRecord,
    JobStore,
    compact_json,
    status_json,
)

log = logging.getLogger("serve.runner")

Handler = Callable[[dict[str, Any]], Any]
INTERRUPTED = (
    "interrupted: the server stopped while this job was running (SERVE_REQUEUE_INTERRUPTED "
    "requeues such jobs)"
)


class JobConflict(Exception):
    """The request does not fit the job's state (a 4xx for the client)."""


@dataclass
class ActiveJob:
    record: JobRecord
    control: context.JobControl
    worker_id: str
    started: float  # monotonic
    deadline: float | None  # monotonic


class Runner:
    def __init__(self, handler: Handler, store: JobStore, settings: ServeSettings) -> None:
        self.handler = handler
        self.store = store
        self.settings = settings
        self._active: dict[str, ActiveJob] = {}
        self._progress_at: dict[str, float] = {}
        self._active_lock = threading.Lock()
        self._wake = threading.Condition()
        self._generation = 0  # bumped on every submit: no wake-up is lost
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._webhooks: ThreadPoolExecutor | None = None
        self._watchers: dict[str, dict[int, Callable[[], None]]] = {}
        self._watch_lock = threading.Lock()
        self._watch_ids = iter(range(1, 1 << 62))
        self.retried = 0

    # ------------------------------------------------------------------------------------
    # Life cycle

    def start(self) -> None:
        install_sdk_progress_hook()
        failed, requeued = self.store.recover_interrupted(
            self.settings.requeue_interrupted,
            self.settings.max_attempts,
            INTERRUPTED,
            self.settings.result_ttl_s,
        )
        self.retried += len(requeued)
        if failed or requeued:
            log.warning(
                "jobs interrupted by the last stop: %d failed %s, %d requeued %s",
                len(failed),
                failed,
                len(requeued),
                requeued,
            )
        self._stopping.clear()
        self._webhooks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="serve-webhook")
        for record in self.store.pending_webhooks():
            self._webhooks.submit(self._deliver_webhook, record.id)
        for n in range(1, self.settings.concurrency + 1):
            worker_id = f"{self.settings.worker_id}-{n}"
            thread = threading.Thread(
                target=self._worker_loop, args=(worker_id,), name=f"serve-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        monitor = threading.Thread(target=self._monitor_loop, name="serve-monitor", daemon=True)
        monitor.start()
        self._threads.append(monitor)

    def stop(self, grace_s: float | None = None) -> None:
        """Take no more jobs; give running ones `grace_s` to finish. Jobs still running after
        that count as interrupted at the next start."""
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("stopped with jobs still running in %s", alive)
        else:
            log.info("stopped: no job running")
        self._threads = []
        if self._webhooks is not None:
            self._webhooks.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------
    # Requests

    def submit(
        self,
        job_input: Any,
        *,
        sync: bool = False,
        webhook: str | None = None,
        s3_config: dict[str, Any] | None = None,
        execution_timeout_ms: int | None = None,
        ttl_ms: int | None = None,
    ) -> JobRecord:
        job_id = f"sync-{uuid.uuid4()}" if sync else str(uuid.uuid4())
        record = self.store.insert(
            job_id,
            job_input,
            sync=sync,
            webhook=webhook,
            s3_config=s3_config,
            execution_timeout_ms=execution_timeout_ms,
            ttl_ms=ttl_ms,
        )
        with self._wake:
            self._generation += 1
            self._wake.notify()
        return record

    def cancel(self, job_id: str) -> JobRecord | None:
        """CANCELLED at once if queued or running (a running job is told to stop)."""
        record = self.store.finish(
            job_id,
            CANCELLED,
            result_ttl_s=self._result_ttl(job_id),
            from_states=(IN_QUEUE, IN_PROGRESS),
        )
        if record is None:
            return self.store.get(job_id)
        self._signal_stop(job_id, "cancelled")
        log.info("job %s cancelled", job_id)
        self._on_final(record)
        return record

    def retry(self, job_id: str) -> JobRecord | None:
        with self._active_lock:
            if job_id in self._active:
                raise JobConflict(f"job {job_id} is still stopping; retry it once /health idles")
        record = self.store.retry(job_id)
        if record is None:
            current = self.store.get(job_id)
            if current is None:
                return None
            raise JobConflict(
                f"job {job_id} is {current.status}; only FAILED or TIMED_OUT jobs can be retried"
            )
        self.retried += 1
        with self._wake:
            self._generation += 1
            self._wake.notify()
        return record

    def delete(self, job_id: str) -> JobRecord | None:
        record = self.store.delete(job_id)
        with self._active_lock:
            self._progress_at.pop(job_id, None)
        if record is not None:
            self._signal_stop(job_id, "deleted")
            self._notify(job_id)
        return record

    def purge_queue(self) -> int:
        return self.store.purge_queue()

    def health(self) -> dict[str, Any]:
        counts = self.store.counts()
        with self._active_lock:
            busy = len(self._active)
            stopping = sum(1 for a in self._active.values() if a.control.stop.is_set())
        return {
            "jobs": {
                "completed": counts[COMPLETED],
                "failed": counts[FAILED],
                "inProgress": counts[IN_PROGRESS],
                "inQueue": counts[IN_QUEUE],
                "retried": self.retried,
                "cancelled": counts[CANCELLED],
                "timedOut": counts[TIMED_OUT],
            },
            "workers": {
                "idle": max(0, self.settings.concurrency - busy),
                "running": busy,
                "stopping": stopping,
            },
        }

    # ------------------------------------------------------------------------------------
    # Change notifications, for /runsync and /stream to wait on without polling

    def watch(self, job_id: str, callback: Callable[[], None]) -> int:
        with self._watch_lock:
            token = next(self._watch_ids)
            self._watchers.setdefault(job_id, {})[token] = callback
        return token

    def unwatch(self, job_id: str, token: int) -> None:
        with self._watch_lock:
            callbacks = self._watchers.get(job_id)
            if callbacks is not None:
                callbacks.pop(token, None)
                if not callbacks:
                    del self._watchers[job_id]

    def _notify(self, job_id: str) -> None:
        with self._watch_lock:
            callbacks = list(self._watchers.get(job_id, {}).values())
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a waiter's loop may be gone; never fail the job for it
                log.debug("watcher of %s failed", job_id, exc_info=True)

    # ------------------------------------------------------------------------------------
    # Workers

    def _worker_loop(self, worker_id: str) -> None:
        while not self._stopping.is_set():
            with self._wake:
                generation = self._generation
            try:
                record = self.store.claim_next(worker_id)
            except Exception:
                log.exception("could not read the queue")
                record = None
            if record is None:
                with self._wake:
                    while generation == self._generation and not self._stopping.is_set():
                        self._wake.wait(timeout=1.0)
                continue
            try:
                self._execute(record, worker_id)
            except Exception:  # the server's own bug: fail the job, keep the worker
                log.exception("job %s: the server failed around the handler", record.id)
                self._finish(record, FAILED, None, "internal: the local server failed; see logs")

    def _execute(self, record: JobRecord, worker_id: str) -> None:
        job_id = record.id
        control = context.JobControl(job_id, report_progress=self._report_progress)
        timeout_ms = record.execution_timeout_ms
        if timeout_ms is None and self.settings.execution_timeout_s > 0:
            timeout_ms = round(self.settings.execution_timeout_s * 1000)
        started = time.monotonic()
        active = ActiveJob(
            record,
            control,
            worker_id,
            started,
            started + timeout_ms / 1000 if timeout_ms else None,
        )
        with self._active_lock:
            self._active[job_id] = active
        try:
            # A cancel between the claim and the line above found no control to signal.
            current = self.store.get(job_id)
            if current is None or current.status != IN_PROGRESS:
                return
            log.info("job %s started on %s (attempt %d)", job_id, worker_id, record.attempts)
            self._notify(job_id)
            with context.bind(control):
                status, output_json, error = self._call_handler(record, control, worker_id)
            elapsed_ms = (time.monotonic() - started) * 1000
            ended = self._finish(record, status, output_json, error)
            if ended is None:
                log.info(
                    "job %s returned after it was %s; its result is dropped (%.0f ms)",
                    job_id,
                    control.stop_reason or "removed",
                    elapsed_ms,
                )
            else:
                log.info("job %s %s in %.0f ms", job_id, status, elapsed_ms)
        finally:
            with self._active_lock:
                self._active.pop(job_id, None)

    def _call_handler(
        self, record: JobRecord, control: context.JobControl, worker_id: str
    ) -> tuple[str, str | None, str | None]:
        """(status, output JSON, error) of one run of the handler, by the SDK's rules."""
        job = record.job_payload()
        try:
            returned = self.handler(job)
            if inspect.isawaitable(returned):
                returned = _run_coroutine(returned)
            if inspect.isgenerator(returned) or inspect.isasyncgen(returned):
                return self._consume_stream(job, returned, control)
            output, error = _split_error(returned)
        except Exception as exc:
            log.exception("job %s: the handler raised", record.id)
            # What RunPod's SDK reports for a handler that raises.
            error = json.dumps(
                {
                    "error_type": str(type(exc)),
                    "error_message": str(exc),
                    "error_traceback": traceback.format_exc(),
                    "worker_id": worker_id,
                }
            )
            return FAILED, None, error
        return _encoded(output, error)

    def _consume_stream(
        self, job: dict[str, Any], stream: Any, control: context.JobControl
    ) -> tuple[str, str | None, str | None]:
        chunks: list[Any] = []
        error: str | None = None
        with closing(_iterate(stream, control.stop)) as items:
            for partial in items:
                if isinstance(partial, dict) and partial.get("error"):
                    error = str(partial["error"])  # the SDK ends a stream at an error chunk
                    break
                encoded = _to_json(partial)
                if encoded is None:
                    error = "a streamed output is not JSON serializable"
                    break
                if self.store.add_stream(job["id"], encoded):
                    self._notify(job["id"])
                if self.settings.return_aggregate_stream:
                    chunks.append(partial)
        if error is not None:
            return FAILED, None, error
        return _encoded(chunks if self.settings.return_aggregate_stream else None, None)

    def _report_progress(self, job: dict[str, Any], update: Any) -> None:
        job_id = str(job.get("id"))
        encoded = _to_json(update)
        if encoded is not None and self.store.set_progress(job_id, encoded):
            with self._active_lock:
                self._progress_at[job_id] = time.time()
            self._notify(job_id)

    def progress_time(self, job_id: str) -> float | None:
        """When the job last reported progress (epoch seconds), while it runs."""
        with self._active_lock:
            return self._progress_at.get(job_id)

    def _finish(
        self, record: JobRecord, status: str, output_json: str | None, error: str | None
    ) -> JobRecord | None:
        ended = self.store.finish(
            record.id,
            status,
            output_json=output_json,
            error=error,
            result_ttl_s=self._ttl_for(record.sync),
        )
        if ended is not None:
            self._on_final(ended)
        return ended

    def _signal_stop(self, job_id: str, reason: str) -> None:
        with self._active_lock:
            active = self._active.get(job_id)
        if active is not None:
            active.control.request_stop(reason)

    def _on_final(self, record: JobRecord) -> None:
        with self._active_lock:
            self._progress_at.pop(record.id, None)  # finished_at is the last change now
        self._notify(record.id)
        if record.webhook and self._webhooks is not None:
            # Shutting down: it stays pending, and the next start delivers it.
            with suppress(RuntimeError):
                self._webhooks.submit(self._deliver_webhook, record.id)

    def _ttl_for(self, sync: bool) -> float:
        return self.settings.runsync_result_ttl_s if sync else self.settings.result_ttl_s

    def _result_ttl(self, job_id: str) -> float:
        return self._ttl_for(job_id.startswith("sync-"))

    # ------------------------------------------------------------------------------------
    # Monitor: execution timeouts, queue TTLs, expired results

    def _monitor_loop(self) -> None:
        last_cleanup = 0.0
        while not self._stopping.wait(self.settings.monitor_interval_s):
            try:
                self._check_timeouts()
                for record in self.store.expire_queued(self.settings.result_ttl_s):
                    log.info("job %s TIMED_OUT in the queue (policy.ttl)", record.id)
                    self._on_final(record)
                if time.monotonic() - last_cleanup > 5.0:
                    removed = self.store.delete_expired()
                    if removed:
                        log.info("removed %d job(s) past their result retention", removed)
                    last_cleanup = time.monotonic()
            except Exception:
                log.exception("monitor pass failed")

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        with self._active_lock:
            overdue = [
                a
                for a in self._active.values()
                if a.deadline is not None and now >= a.deadline and not a.control.stop.is_set()
            ]
        for active in overdue:
            assert active.deadline is not None  # overdue ones have a deadline
            limit_ms = round((active.deadline - active.started) * 1000)
            record = self.store.finish(
                active.record.id,
                TIMED_OUT,
                error=f"execution timeout: the job ran past {limit_ms} ms "
                "(policy.executionTimeout, or SERVE_EXECUTION_TIMEOUT_S)",
                result_ttl_s=self._ttl_for(active.record.sync),
            )
            active.control.request_stop("timed out")
            if record is not None:
                log.warning("job %s TIMED_OUT after %d ms", record.id, limit_ms)
                self._on_final(record)

    # ------------------------------------------------------------------------------------
    # Webhooks: RunPod POSTs the /status body, and retries twice 10 s apart on failure

    def _deliver_webhook(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None or not record.webhook or record.webhook_state != "pending":
            return
        body = status_json(record).encode()
        attempts = 1 + self.settings.webhook_retries
        allow_private = self.settings.allow_private_webhooks or get_settings().allow_private_urls
        for attempt in range(1, attempts + 1):
            try:
                status = _post_webhook(
                    record.webhook, body, self.settings.webhook_timeout_s, allow_private
                )
                if 200 <= status < 300:
                    self.store.set_webhook_state(job_id, "delivered")
                    log.info("job %s webhook delivered (attempt %d)", job_id, attempt)
                    return
                problem = f"HTTP {status}"
            except InvalidInput as exc:  # refused by the guard: no retry can change that
                log.warning("job %s webhook refused: %s", job_id, exc.message)
                break
            except FetchFailed as exc:  # no address (DNS)
                problem = exc.message
            except (*NETWORK_ERRORS, *CERTIFICATE_ERRORS) as exc:
                problem = describe(exc)
            log.warning(
                "job %s webhook attempt %d/%d failed: %s", job_id, attempt, attempts, problem
            )
            # Stopping leaves it pending: the next start delivers it.
            if attempt < attempts and self._stopping.wait(self.settings.webhook_retry_delay_s):
                return
        self.store.set_webhook_state(job_id, "failed")


def _post_webhook(url: str, body: bytes, timeout_s: float, allow_private: bool) -> int:
    return post_once(
        url,
        body,
        timeout_s=timeout_s,
        allow_private=allow_private,
        field="webhook",
        opt_in="SERVE_ALLOW_PRIVATE_WEBHOOKS=true (or ALLOW_PRIVATE_URLS=true)",
        setting="SERVE_WEBHOOK_TIMEOUT_S",
    )


# ----------------------------------------------------------------------------------------
# Handler plumbing


def _split_error(returned: Any) -> tuple[Any, str | None]:
    """As the SDK's run_job: a dict's `error` fails the job, the rest stays its output."""
    if not isinstance(returned, dict):
        return returned, None
    output = dict(returned)
    error = output.pop("error", None)
    output.pop("refresh_worker", None)
    if error is not None and not isinstance(error, str):
        error = json.dumps(error, default=str)
    return (output or None), (error or None)


def _encoded(output: Any, error: str | None) -> tuple[str, str | None, str | None]:
    output_json = None if output is None else _to_json(output)
    if output is not None and output_json is None:
        return FAILED, None, "the handler's output is not JSON serializable"
    return (FAILED if error else COMPLETED), output_json, error


def _to_json(value: Any) -> str | None:
    """Strict JSON (browsers reject NaN): non-finite floats become null; None if unencodable."""
    try:
        return compact_json(value, allow_nan=False)
    except ValueError:  # NaN or Infinity somewhere (or a circular reference)
        pass
    except TypeError:
        return None
    try:
        return compact_json(_finite(value), allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _run_coroutine(awaitable: Any) -> Any:
    async def wrap() -> Any:
        return await awaitable

    return asyncio.run(wrap())


def _iterate(stream: Any, stop: threading.Event) -> Generator[Any, None, None]:
    """A generator's or an async generator's items, until it ends or `stop` is set; the
    generator is closed either way (its `finally` blocks run)."""
    if inspect.isasyncgen(stream):
        loop = asyncio.new_event_loop()
        try:
            while not stop.is_set():
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()
    else:
        try:
            while not stop.is_set():
                try:
                    yield next(stream)
                except StopIteration:
                    return
        finally:
            stream.close()


_hook_lock = threading.Lock()


def install_sdk_progress_hook() -> None:
    """Make `runpod.serverless.progress_update(job, update)` land in the job's /status when the
    job runs under this server (RunPod's own goes to RunPod's job API). Installed before the
    handler module is imported, so a `from runpod.serverless import progress_update` binds it."""
    import runpod.serverless

    with _hook_lock:
        if getattr(runpod.serverless.progress_update, "_serve_hook", False):
            return
        original = runpod.serverless.progress_update

        def progress_update(job: dict[str, Any], progress: Any) -> None:
            control = context.running(str(job.get("id")))
            if control is None:
                original(job, progress)
            else:
                control.report_progress(job, progress)

        vars(progress_update)["_serve_hook"] = True  # a function attribute (mypy has none)
        runpod.serverless.progress_update = progress_update
