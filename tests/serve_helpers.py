"""Helpers for the local endpoint server's tests: the server in this process (uvicorn in a
thread, real HTTP on loopback) or as a subprocess (`python -m core.serve ...`), and small
handlers the tests serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import runpod
import uvicorn

from core.control import cancel_requested
from core.serve.app import create_app
from core.serve.runner import Runner
from core.serve.settings import ServeSettings
from core.serve.store import FINAL_STATES, JobStore
from tests.conftest import REPO, free_port

API_KEY = "test-key-0123456789"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, every: float = 0.02) -> Any:
    """The first truthy value of `predicate()`, or AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        time.sleep(every)


@dataclass
class Client:
    """Plain HTTP to the server (RunPod's own client is used where a test is about it)."""

    base_url: str
    api_key: str | None = API_KEY
    session: requests.Session = field(default_factory=requests.Session)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return self.session.request(
            method, self.base_url + path, headers=headers, timeout=30, **kwargs
        )

    def run(self, job_input: dict[str, Any], **extra: Any) -> str:
        response = self.call("POST", "/run", json={"input": job_input, **extra})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.call("GET", f"/status/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def health(self) -> dict[str, Any]:
        return self.call("GET", "/health").json()

    def wait_status(self, job_id: str, states: tuple[str, ...], timeout: float = 20) -> dict:
        return wait_until(
            lambda: (body := self.status(job_id))["status"] in states and body, timeout
        )

    def wait_final(self, job_id: str, timeout: float = 20) -> dict[str, Any]:
        return self.wait_status(job_id, FINAL_STATES, timeout)

    def wait_idle(self, timeout: float = 10) -> dict[str, Any]:
        """Until no worker thread is busy (a stopped job's thread has really ended)."""
        return wait_until(lambda: (h := self.health())["workers"]["running"] == 0 and h, timeout)


@dataclass
class LocalServer:
    base_url: str
    runner: Runner
    settings: ServeSettings
    client: Client

    def endpoint(self, endpoint_id: str = "local-endpoint") -> runpod.Endpoint:
        """RunPod's own client, pointed here by its base URL alone."""
        runpod.endpoint_url_base = self.base_url
        return runpod.Endpoint(endpoint_id, api_key=self.settings_key())

    def settings_key(self) -> str:
        key = self.settings.api_key
        return key.get_secret_value() if key else "no-key-configured"


@contextmanager
def local_server(
    handler: Callable[[dict[str, Any]], Any],
    db_path: Path,
    app_contract: Any = None,
    **overrides: Any,
) -> Iterator[LocalServer]:
    """The real app and runner on a loopback port, served by uvicorn in a thread; with an app
    contract (`core.apps.get_app(name)`), its routes too, as `--app NAME` serves them."""
    params = {"api_key": API_KEY, "monitor_interval_s": 0.05, **overrides}
    settings = ServeSettings(db_path=db_path, port=free_port(), **params)
    store = JobStore(settings.db_path)
    runner = Runner(handler, store, settings)
    app = create_app(runner, settings, app_contract)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout=15)
    assert server.started, "uvicorn did not start"
    base_url = f"http://127.0.0.1:{settings.port}"
    key = settings.api_key.get_secret_value() if settings.api_key else None
    try:
        yield LocalServer(base_url, runner, settings, Client(base_url, key))
    finally:
        server.should_exit = True
        thread.join(30)
        store.close()


# ----------------------------------------------------------------------------------------------
# The server as a real process, for SIGKILL


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    client: Client
    log_path: Path

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server_process(handler_spec: str, tmp_path: Path, **env: str) -> ServerProcess:
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "RUNPOD_"))}
    environment.update(
        SERVE_DB_PATH=str(tmp_path / "jobs.sqlite3"),
        SERVE_API_KEY=API_KEY,
        SERVE_PORT=str(port),
        PYTHONUNBUFFERED="1",
        **env,
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "core.serve", handler_spec],
            cwd=REPO,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process, Client(f"http://127.0.0.1:{port}"), log_path)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {server.log()[-3000:]}")
        try:
            return server.client.call("GET", "/health").status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(up, timeout=60, every=0.1)
    return server


# ----------------------------------------------------------------------------------------------
# Handlers served by the tests


class Recorder:
    """What a handler saw: every execution by job id, and the most running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executions: Counter[str] = Counter()
        self.running = 0
        self.max_running = 0
        self.stopped: list[str] = []

    def enter(self, job_id: str) -> None:
        with self.lock:
            self.executions[job_id] += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


def gated_handler(recorder: Recorder, gates: dict[str, threading.Event]) -> Callable:
    """Squares `n`; reports progress through RunPod's SDK call; with `gate`, waits for the test
    to open it, stopping early (cooperatively) when the server cancels the job."""

    def handler(job: dict[str, Any]) -> dict[str, Any]:
        recorder.enter(job["id"])
        try:
            job_input = job["input"]
            runpod.serverless.progress_update(job, {"stage": "working", "progress": 10})
            gate = gates.get(job_input.get("gate", ""))
            if gate is not None:
                while not gate.wait(0.01):
                    if cancel_requested():
                        recorder.stopped.append(job["id"])
                        return {"stopped": True}
            if job_input.get("sleep"):
                time.sleep(job_input["sleep"])  # ignores the stop signal, on purpose
            if job_input.get("fail"):
                return {"error": "asked to fail", "error_code": "invalid_input"}
            if job_input.get("raise"):
                raise ValueError("raised on purpose")
            if job_input.get("nan"):
                return {"value": float("nan"), "ok": 1.5}
            n = job_input.get("n", 0)
            return {"square": n * n, "n": n}
        finally:
            recorder.leave()

    return handler


def file_gated(job: dict[str, Any]) -> dict[str, Any]:
    """For the server as a subprocess: waits until the file `gate` exists, then appends the job
    id to the file `log` (one line per execution that got that far) and squares `n`."""
    job_input = job["input"]
    runpod.serverless.progress_update(job, {"stage": "waiting"})
    gate = job_input.get("gate")
    while gate and not Path(gate).exists():
        if cancel_requested():
            return {"stopped": True}
        time.sleep(0.02)
    with open(job_input["log"], "a") as log:
        log.write(job["id"] + "\n")
    n = job_input.get("n", 0)
    return {"square": n * n}
