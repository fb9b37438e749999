"""Jobs in SQLite: the queue, the states, the results and the stream chunks, on disk.

One connection shared by the server's threads under a lock (every statement is short). WAL
with `synchronous=NORMAL` survives the process being killed at any point: a committed job is
never lost, only an OS crash can lose the last transactions. Every state change is one
conditional UPDATE (`... WHERE status IN (...)`), so a cancel racing a finishing job, or two
workers racing for the queue head, have exactly one winner.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
FINAL_STATES = (COMPLETED, FAILED, CANCELLED, TIMED_OUT)
ALL_STATES = (IN_QUEUE, IN_PROGRESS, *FINAL_STATES)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    sync INTEGER NOT NULL DEFAULT 0,
    input_json TEXT NOT NULL,
    s3_config_json TEXT,
    webhook TEXT,
    execution_timeout_ms INTEGER,
    ttl_ms INTEGER,
    created_at REAL NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    worker_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    progress_json TEXT,
    output_json TEXT,
    error TEXT,
    stream_count INTEGER NOT NULL DEFAULT 0,
    stream_read INTEGER NOT NULL DEFAULT 0,
    webhook_state TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, queued_at);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS stream (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    output TEXT NOT NULL,
    PRIMARY KEY (job_id, n)
);
"""


@dataclass(frozen=True)
class JobRecord:
    id: str
    status: str
    sync: bool
    input_json: str
    s3_config_json: str | None
    webhook: str | None
    execution_timeout_ms: int | None
    ttl_ms: int | None
    created_at: float
    queued_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    worker_id: str | None
    attempts: int
    progress_json: str | None
    output_json: str | None
    error: str | None
    stream_count: int
    stream_read: int
    webhook_state: str | None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES

    def job_payload(self) -> dict[str, Any]:
        """The job as a handler receives it from RunPod: id, input and the job's s3Config."""
        job: dict[str, Any] = {"id": self.id, "input": json.loads(self.input_json)}
        if self.s3_config_json:
            job["s3Config"] = json.loads(self.s3_config_json)
        return job


_COLUMNS = ", ".join(JobRecord.__dataclass_fields__)


def compact_json(value: Any, *, allow_nan: bool = True) -> str:
    """JSON as RunPod's API answers it: no spaces."""
    return json.dumps(value, separators=(",", ":"), allow_nan=allow_nan)


def status_json(record: JobRecord) -> str:
    """The job as RunPod's /status shows it (also the webhook's body): `id`, `status`,
    `delayTime` and `workerId` once started, `executionTime` once ended, the latest progress
    as `output` while IN_PROGRESS, the result's `output` and `error` once ended. Built from
    the stored JSON text, so a large output is not parsed and re-encoded on every poll."""
    head: dict[str, Any] = {"id": record.id, "status": record.status}
    if record.started_at is not None:
        head["delayTime"] = round((record.started_at - record.created_at) * 1000)
        if record.finished_at is not None:
            head["executionTime"] = round((record.finished_at - record.started_at) * 1000)
        head["workerId"] = record.worker_id
    if record.error is not None:
        head["error"] = record.error
    output = record.progress_json if record.status == IN_PROGRESS else record.output_json
    text = compact_json(head)
    if output is None:
        return text
    return f'{text[:-1]},"output":{output}}}'


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # isolation_level=None: autocommit, with explicit BEGIN IMMEDIATE where a read and a
        # write must be one step.
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30
        )
        # Inputs may hold signed URLs and s3Config keys: readable by this user only (SQLite
        # gives its -wal and -shm files the same mode).
        path.touch(mode=0o600, exist_ok=True)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    # ------------------------------------------------------------------------------------
    # Submitting and reading

    def insert(
        self,
        job_id: str,
        job_input: Any,
        *,
        sync: bool = False,
        webhook: str | None = None,
        s3_config: dict[str, Any] | None = None,
        execution_timeout_ms: int | None = None,
        ttl_ms: int | None = None,
    ) -> JobRecord:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, status, sync, input_json, s3_config_json, webhook, "
                "execution_timeout_ms, ttl_ms, created_at, queued_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    IN_QUEUE,
                    int(sync),
                    compact_json(job_input),
                    compact_json(s3_config) if s3_config else None,
                    webhook,
                    execution_timeout_ms,
                    ttl_ms,
                    now,
                    now,
                ),
            )
            record = self._row(db, job_id)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown or past its result retention."""
        with self._lock:
            record = self._row(self._db, job_id)
        if record is None or (record.expires_at is not None and record.expires_at <= time.time()):
            return None
        return record

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) FROM jobs WHERE expires_at IS NULL OR expires_at > ? "
                "GROUP BY status",
                (time.time(),),
            ).fetchall()
        counts = dict.fromkeys(ALL_STATES, 0)
        counts.update(dict(rows))
        return counts

    def list_jobs(
        self, statuses: Iterable[str] = ALL_STATES, limit: int = 100, offset: int = 0
    ) -> tuple[list[JobRecord], int]:
        """Newest first, and how many match in all."""
        wanted = list(statuses)
        marks = ", ".join("?" * len(wanted))
        where = f"status IN ({marks}) AND (expires_at IS NULL OR expires_at > ?)"
        params = [*wanted, time.time()]
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", params).fetchone()
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE {where} "
                "ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [JobRecord(*row) for row in rows], int(total[0])

    # ------------------------------------------------------------------------------------
    # The queue

    def claim_next(self, worker_id: str) -> JobRecord | None:
        """Move the oldest queued job (within its TTL) to IN_PROGRESS for this worker."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status = ? "
                "AND (ttl_ms IS NULL OR created_at + ttl_ms / 1000.0 > ?) "
                "ORDER BY queued_at, rowid LIMIT 1",
                (IN_QUEUE, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = ?, started_at = ?, worker_id = ?, "
                "attempts = attempts + 1, progress_json = NULL WHERE id = ?",
                (IN_PROGRESS, now, worker_id, row[0]),
            )
            return self._row(db, row[0])

    def has_queued(self) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM jobs WHERE status = ? LIMIT 1", (IN_QUEUE,))
            return row.fetchone() is not None

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        output_json: str | None = None,
        error: str | None = None,
        result_ttl_s: float = 0.0,
        from_states: tuple[str, ...] = (IN_PROGRESS,),
    ) -> JobRecord | None:
        """End the job if it is still in one of `from_states`; None when it was not (already
        ended by a cancel or a timeout, or deleted): the caller lost the race."""
        now = time.time()
        marks = ", ".join("?" * len(from_states))
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, output_json = ?, error = ?, finished_at = ?, "
                "expires_at = ?, progress_json = NULL, "
                "webhook_state = CASE WHEN webhook IS NULL THEN NULL ELSE 'pending' END "
                f"WHERE id = ? AND status IN ({marks})",
                (
                    status,
                    output_json,
                    error,
                    now,
                    now + result_ttl_s if result_ttl_s > 0 else None,
                    job_id,
                    *from_states,
                ),
            )
            return self._row(db, job_id) if cursor.rowcount else None

    def retry(self, job_id: str) -> JobRecord | None:
        """FAILED or TIMED_OUT -> IN_QUEUE at the back of the queue, output cleared."""
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, queued_at = ?, started_at = NULL, "
                "finished_at = NULL, expires_at = NULL, worker_id = NULL, output_json = NULL, "
                "error = NULL, progress_json = NULL, stream_count = 0, stream_read = 0, "
                "webhook_state = NULL WHERE id = ? AND status IN (?, ?) "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (IN_QUEUE, now, job_id, FAILED, TIMED_OUT, now),
            )
            if not cursor.rowcount:
                return None
            db.execute("DELETE FROM stream WHERE job_id = ?", (job_id,))
            return self._row(db, job_id)

    def recover_interrupted(
        self, requeue: bool, max_attempts: int, reason: str, result_ttl_s: float
    ) -> tuple[list[str], list[str]]:
        """At start-up: jobs left IN_PROGRESS by a dead process are requeued (when asked and
        under `max_attempts`) or FAILED with `reason`. Returns (failed ids, requeued ids)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, attempts FROM jobs WHERE status = ?", (IN_PROGRESS,)
            ).fetchall()
        failed, requeued = [], []
        for job_id, attempts in rows:
            if requeue and attempts < max_attempts:
                with self._transaction() as db:
                    db.execute(
                        "UPDATE jobs SET status = ?, started_at = NULL, worker_id = NULL, "
                        "progress_json = NULL, stream_count = 0, stream_read = 0 WHERE id = ?",
                        (IN_QUEUE, job_id),
                    )
                    db.execute("DELETE FROM stream WHERE job_id = ?", (job_id,))
                requeued.append(job_id)
            else:
                why = reason if not requeue else f"{reason}; not requeued after {attempts} starts"
                self.finish(job_id, FAILED, error=why, result_ttl_s=result_ttl_s)
                failed.append(job_id)
        return failed, requeued

    def expire_queued(self, result_ttl_s: float) -> list[JobRecord]:
        """Queued jobs past their `policy.ttl` become TIMED_OUT (no worker took them in time)."""
        now = time.time()
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status = ? AND ttl_ms IS NOT NULL "
                "AND created_at + ttl_ms / 1000.0 <= ?",
                (IN_QUEUE, now),
            ).fetchall()
        expired = []
        for (job_id,) in rows:
            record = self.finish(
                job_id,
                TIMED_OUT,
                error="the job waited in the queue past its policy.ttl",
                result_ttl_s=result_ttl_s,
                from_states=(IN_QUEUE,),
            )
            if record is not None:
                expired.append(record)
        return expired

    # ------------------------------------------------------------------------------------
    # While running

    def set_progress(self, job_id: str, progress_json: str) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET progress_json = ? WHERE id = ? AND status = ?",
                (progress_json, job_id, IN_PROGRESS),
            )
            return bool(cursor.rowcount)

    def add_stream(self, job_id: str, output_json: str) -> bool:
        with self._transaction() as db:
            row = db.execute(
                "SELECT stream_count FROM jobs WHERE id = ? AND status = ?", (job_id, IN_PROGRESS)
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "INSERT INTO stream (job_id, n, output) VALUES (?, ?, ?)",
                (job_id, row[0], output_json),
            )
            db.execute("UPDATE jobs SET stream_count = stream_count + 1 WHERE id = ?", (job_id,))
            return True

    def take_stream(self, job_id: str) -> tuple[JobRecord | None, list[str]]:
        """The chunks no /stream call has returned yet (RunPod's /stream hands each out once)."""
        with self._transaction() as db:
            record = self._row(db, job_id)
            if record is None or record.stream_read >= record.stream_count:
                return record, []
            rows = db.execute(
                "SELECT output FROM stream WHERE job_id = ? AND n >= ? ORDER BY n",
                (job_id, record.stream_read),
            ).fetchall()
            db.execute(
                "UPDATE jobs SET stream_read = ? WHERE id = ?", (record.stream_count, job_id)
            )
        return record, [row[0] for row in rows]

    def stream_outputs(self, job_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT output FROM stream WHERE job_id = ? ORDER BY n", (job_id,)
            ).fetchall()
        return [row[0] for row in rows]

    # ------------------------------------------------------------------------------------
    # Removing

    def purge_queue(self) -> int:
        with self._transaction() as db:
            db.execute(
                "DELETE FROM stream WHERE job_id IN (SELECT id FROM jobs WHERE status = ?)",
                (IN_QUEUE,),
            )
            return db.execute("DELETE FROM jobs WHERE status = ?", (IN_QUEUE,)).rowcount

    def delete(self, job_id: str) -> JobRecord | None:
        with self._transaction() as db:
            record = self._row(db, job_id)
            if record is not None:
                db.execute("DELETE FROM stream WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return record

    def delete_expired(self) -> int:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "DELETE FROM stream WHERE job_id IN "
                "(SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?)",
                (now,),
            )
            return db.execute(
                "DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).rowcount

    # ------------------------------------------------------------------------------------
    # Webhooks

    def pending_webhooks(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE webhook_state = 'pending'"
            ).fetchall()
        return [JobRecord(*row) for row in rows]

    def set_webhook_state(self, job_id: str, state: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET webhook_state = ? WHERE id = ?", (state, job_id))
