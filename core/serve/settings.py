"""The local endpoint server's own settings: `SERVE_*` environment variables (pydantic-settings).

Defaults follow RunPod's endpoint behaviour (600 s execution timeout, results kept 30 minutes
after /run and 1 minute after /runsync, /runsync waits 90 s, 10 MB /run and 20 MB /runsync
bodies, webhook retried twice 10 s apart) so a frontend meets the same limits here as there.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.config import REPO_ROOT


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVE_", case_sensitive=False, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    concurrency: int = Field(default=1, ge=1, le=256)
    """Jobs run at once, each in a thread of this process (beside the preloaded models)."""
    db_path: Path = REPO_ROOT / "outputs" / "serve-jobs.sqlite3"
    app: str | None = None
    """An app whose old backend's routes are served too (`--app`): `studio`, `splatt`."""
    api_key: SecretStr | None = None
    """When set, every route needs `Authorization: Bearer <key>` (or the bare key, as RunPod)."""

    execution_timeout_s: float = Field(default=600.0, ge=0)
    """A job's limit when its `policy.executionTimeout` is absent; 0: none."""
    min_execution_timeout_ms: int = Field(default=5000, ge=1)
    """Smallest `policy.executionTimeout` accepted (RunPod's floor is 5 s)."""
    result_ttl_s: float = Field(default=1800.0, ge=0)
    """How long a /run job's result is kept after it ends; 0: forever (self-hosting)."""
    runsync_result_ttl_s: float = Field(default=60.0, ge=0)
    runsync_wait_s: float = Field(default=90.0, gt=0, le=300)
    """How long /runsync waits before answering with the job still running (`?wait=` ms)."""
    stream_wait_s: float = Field(default=1.0, ge=0, le=30)
    """/stream holds a request this long for a new chunk before answering with none."""
    max_run_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_runsync_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    return_aggregate_stream: bool = True
    """A generator handler's final `output` is the list of everything it yielded (the SDK's
    `return_aggregate_stream`); false leaves it empty, as an endpoint without that flag."""

    requeue_interrupted: bool = False
    """A job that was running when the process died is requeued (true) or FAILED (false)."""
    max_attempts: int = Field(default=3, ge=1, le=100)
    """Requeued at most until it has been started this many times, then FAILED."""

    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_retries: int = Field(default=2, ge=0, le=10)
    webhook_retry_delay_s: float = Field(default=10.0, ge=0)
    allow_private_webhooks: bool = False
    """Deliver webhooks to private, loopback or link-local addresses (a receiver on this
    machine or network); ALLOW_PRIVATE_URLS=true allows them too."""

    worker_id: str = Field(default_factory=lambda: f"local-{socket.gethostname()}")
    """`workerId` in responses: this value and the worker thread's number."""
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    """On SIGTERM/SIGINT, how long running jobs may finish; the rest count as interrupted."""
    monitor_interval_s: float = Field(default=0.1, gt=0, le=5)
    """How often execution timeouts and queue TTLs are checked."""
    access_log: bool = False
    cors_origins: str = ""
    """Comma-separated origins a browser app may call from (`http://localhost:3000`, or `*`);
    empty: none (a frontend's server-side proxy needs none)."""
