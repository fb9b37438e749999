"""The local endpoint server (core/serve) against RunPod's own Python client and plain HTTP:
routes, progress, streams, cancel, timeouts, webhooks, API key, bad bodies, many jobs."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import runpod

from core.serve.loader import load_handler
from tests.serve_helpers import (
    API_KEY,
    Client,
    LocalServer,
    Recorder,
    gated_handler,
    local_server,
    wait_until,
)


@pytest.fixture()
def gates() -> Iterator[dict[str, threading.Event]]:
    events: dict[str, threading.Event] = {}
    yield events
    for event in events.values():  # never leave a worker blocked
        event.set()


@pytest.fixture()
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture()
def server(
    tmp_path: Path, recorder: Recorder, gates: dict[str, threading.Event]
) -> Iterator[LocalServer]:
    with local_server(
        gated_handler(recorder, gates), tmp_path / "jobs.sqlite3", min_execution_timeout_ms=100
    ) as running:
        yield running


def open_gate(gates: dict[str, threading.Event], name: str) -> str:
    gates[name] = threading.Event()
    return name


# ----------------------------------------------------------------------------------------------
# RunPod's own client


def test_runpod_client_runs_reads_progress_and_cancels(
    server: LocalServer, recorder: Recorder, gates: dict[str, threading.Event]
) -> None:
    endpoint = server.endpoint("my-endpoint-id")

    job = endpoint.run({"n": 7})
    assert job.output(timeout=10) == {"square": 49, "n": 7}
    assert job.status() == "COMPLETED"
    assert endpoint.run_sync({"n": 3}, timeout=10) == {"square": 9, "n": 3}

    # Progress shows in /status as `output` while the job runs.
    gate = open_gate(gates, "progress")
    job = endpoint.run({"n": 5, "gate": gate})
    wait_until(lambda: job.status() == "IN_PROGRESS")
    body = server.client.status(job.job_id)
    assert body["output"] == {"stage": "working", "progress": 10}, body
    assert body["workerId"] and body["delayTime"] >= 0 and "executionTime" not in body
    gates[gate].set()
    assert job.output(timeout=10) == {"square": 25, "n": 5}
    done = server.client.status(job.job_id)
    assert done["executionTime"] >= 0 and done["output"] == {"square": 25, "n": 5}

    # Cancel a running job: CANCELLED at once, and the handler is told to stop.
    gate = open_gate(gates, "cancel-running")
    running = endpoint.run({"gate": gate})
    wait_until(lambda: running.status() == "IN_PROGRESS")
    queued = endpoint.run({"n": 1})  # concurrency 1: waits behind the running job
    assert queued.status() == "IN_QUEUE"
    assert queued.cancel() == {"id": queued.job_id, "status": "CANCELLED"}
    assert running.cancel() == {"id": running.job_id, "status": "CANCELLED"}
    assert running.status() == "CANCELLED"
    wait_until(lambda: running.job_id in recorder.stopped)
    health = server.client.wait_idle()
    assert queued.job_id not in recorder.executions  # a cancelled queued job never runs
    assert health["jobs"]["cancelled"] == 2 and health["jobs"]["completed"] == 3, health
    assert endpoint.health()["workers"] == {"idle": 1, "running": 0, "stopping": 0}

    # purge-queue removes what waits, not what runs.
    gate = open_gate(gates, "purge")
    blocker = endpoint.run({"gate": gate})
    wait_until(lambda: blocker.status() == "IN_PROGRESS")
    waiting = [endpoint.run({"n": i}) for i in range(3)]
    assert endpoint.purge_queue() == {"removed": 3, "status": "completed"}
    assert server.client.call("GET", f"/status/{waiting[0].job_id}").status_code == 404
    gates[gate].set()
    assert blocker.output(timeout=10) == {"square": 0, "n": 0}

    # A wrong key: the SDK's own 401 handling.
    with pytest.raises(RuntimeError, match="401 Unauthorized"):
        runpod.Endpoint("my-endpoint-id", api_key="wrong-key").run({"n": 1})


def test_runpod_asyncio_client(server: LocalServer) -> None:
    from runpod import AsyncioEndpoint, http_client

    server.endpoint()  # points runpod.endpoint_url_base here

    async def main() -> tuple[Any, Any, dict[str, Any]]:
        async with http_client.AsyncClientSession() as session:
            endpoint = AsyncioEndpoint("async-endpoint", session, api_key=API_KEY)
            job = await endpoint.run({"n": 11})
            output = await job.output(timeout=10)
            return output, await job.status(), await endpoint.health()

    output, status, health = asyncio.run(main())
    assert output == {"square": 121, "n": 11} and status == "COMPLETED"
    assert health["jobs"]["completed"] == 1


GENERATOR_MODULE = '''
import time

from core.control import cancel_requested

CLOSED = []


def handler(job):
    """Yields `count` chunks, `delay` seconds apart (forever when count is 0)."""
    count, delay = job["input"].get("count", 3), job["input"].get("delay", 0.0)
    i = 0
    try:
        while count == 0 or i < count:
            time.sleep(delay)
            yield {"chunk": i, "word": f"w{i}"}
            i += 1
    finally:
        CLOSED.append((job["id"], i))


async def async_handler(job):
    for i in range(job["input"].get("count", 3)):
        yield {"chunk": i}
'''


def test_generator_handler_streams_and_stops_on_cancel(tmp_path: Path) -> None:
    """A generator handler module written here, loaded by file like `python -m core.serve`."""
    module_path = tmp_path / "streaming_handler.py"
    module_path.write_text(GENERATOR_MODULE)
    handler, module = load_handler(str(module_path))
    with local_server(handler, tmp_path / "jobs.sqlite3") as server:
        endpoint = server.endpoint()
        job = endpoint.run({"count": 4, "delay": 0.05})
        chunks = list(job.stream())
        assert chunks == [{"chunk": i, "word": f"w{i}"} for i in range(4)]
        # The final output aggregates the stream (the SDK's return_aggregate_stream).
        assert job.output(timeout=5) == chunks
        # /stream hands each chunk out once, as RunPod's does.
        again = server.client.call("GET", f"/stream/{job.job_id}").json()
        assert again == {"id": job.job_id, "status": "COMPLETED", "stream": []}

        endless = endpoint.run({"count": 0, "delay": 0.05})
        first = wait_until(
            lambda: server.client.call("POST", f"/stream/{endless.job_id}").json()["stream"]
        )
        assert first[0] == {"output": {"chunk": 0, "word": "w0"}}
        assert endless.cancel()["status"] == "CANCELLED"
        # The generator was closed (its finally ran) at the next yield, and no more chunks.
        produced = wait_until(lambda: [n for i, n in module.CLOSED if i == endless.job_id])
        server.client.wait_idle()
        time.sleep(0.2)
        assert [n for i, n in module.CLOSED if i == endless.job_id] == produced
        rest = server.client.call("GET", f"/stream/{endless.job_id}").json()
        assert rest["status"] == "CANCELLED" and len(rest["stream"]) <= produced[0]

    handler, _ = load_handler(f"{module_path}:async_handler")
    with local_server(handler, tmp_path / "async.sqlite3") as server:
        job = server.endpoint().run({"count": 2})
        assert job.output(timeout=5) == [{"chunk": 0}, {"chunk": 1}]


# ----------------------------------------------------------------------------------------------
# Many jobs


def test_two_hundred_jobs_at_concurrency_two(tmp_path: Path) -> None:
    recorder = Recorder()

    def square(job: dict[str, Any]) -> dict[str, Any]:
        recorder.enter(job["id"])
        try:
            runpod.serverless.progress_update(job, {"stage": "squaring", "n": job["input"]["n"]})
            n = job["input"]["n"]
            time.sleep(0.1 if n % 25 == 0 else 0.004)  # a few slow ones, for the poller
            return {"square": n * n, "n": n}
        finally:
            recorder.leave()

    with local_server(square, tmp_path / "jobs.sqlite3", concurrency=2) as server:
        client = server.client
        ids = {client.run({"n": n}): n for n in range(200)}
        assert len(ids) == 200

        # Poll what runs while the queue drains: progress is in /status.
        seen_progress: list[dict[str, Any]] = []

        def drained() -> bool:
            for item in client.call("GET", "/jobs?status=IN_PROGRESS").json()["jobs"]:
                body = client.status(item["id"])
                if body["status"] == "IN_PROGRESS" and "output" in body:
                    seen_progress.append(body)
            return client.call("GET", "/jobs?status=IN_PROGRESS,IN_QUEUE").json()["total"] == 0

        wait_until(drained, timeout=60, every=0.005)
        assert seen_progress, "no IN_PROGRESS status with progress was seen"
        assert all(b["output"] == {"stage": "squaring", "n": ids[b["id"]]} for b in seen_progress)

        for job_id, n in ids.items():
            body = client.status(job_id)
            assert body["status"] == "COMPLETED" and body["output"] == {"square": n * n, "n": n}
        assert set(recorder.executions) == set(ids)  # none lost
        assert set(recorder.executions.values()) == {1}  # none run twice
        assert recorder.max_running == 2
        health = client.health()
        assert health["jobs"]["completed"] == 200 and health["jobs"]["inQueue"] == 0
        listing = client.call("GET", "/jobs?status=COMPLETED&limit=5&offset=0").json()
        assert listing["total"] == 200 and len(listing["jobs"]) == 5


# ----------------------------------------------------------------------------------------------
# Timeouts, failures, result retention


def test_execution_timeout_retry_and_failures(
    server: LocalServer, recorder: Recorder, gates: dict[str, threading.Event]
) -> None:
    client = server.client
    # A cooperative handler: TIMED_OUT at the limit, and its thread ends.
    gate = open_gate(gates, "closed")
    gated = client.run({"gate": gate, "n": 2}, policy={"executionTimeout": 300})
    started = time.monotonic()
    body = client.wait_final(gated)
    assert body["status"] == "TIMED_OUT" and "execution timeout" in body["error"], body
    assert 0.25 < time.monotonic() - started < 3
    wait_until(lambda: gated in recorder.stopped)
    client.wait_idle()

    # A handler that ignores the signal: TIMED_OUT all the same; its slot is `stopping` until
    # it returns, and its late result does not replace TIMED_OUT.
    sleeper = client.run({"sleep": 1.5}, policy={"executionTimeout": 200})
    assert client.wait_final(sleeper)["status"] == "TIMED_OUT"
    assert client.health()["workers"] == {"idle": 0, "running": 1, "stopping": 1}
    client.wait_idle()
    assert client.status(sleeper)["status"] == "TIMED_OUT"

    # /retry requeues a TIMED_OUT job under the same id; with its gate open it finishes.
    gates[gate].set()
    assert client.call("POST", f"/retry/{gated}").json() == {"id": gated, "status": "IN_QUEUE"}
    body = client.wait_final(gated)
    assert body["status"] == "COMPLETED" and body["output"] == {"square": 4, "n": 2}
    assert recorder.executions[gated] == 2
    assert client.health()["jobs"]["retried"] == 1
    conflict = client.call("POST", f"/retry/{gated}")
    assert conflict.status_code == 409 and "only FAILED or TIMED_OUT" in conflict.json()["error"]

    # A dict with `error` fails the job (the rest stays in output); so does an exception.
    body = client.wait_final(client.run({"fail": True}))
    assert body["status"] == "FAILED" and body["error"] == "asked to fail"
    assert body["output"] == {"error_code": "invalid_input"}
    body = client.wait_final(client.run({"raise": True}))
    assert body["status"] == "FAILED"
    assert json.loads(body["error"])["error_message"] == "raised on purpose"
    # NaN is not JSON a browser can parse: it comes back as null.
    body = client.wait_final(client.run({"nan": True}))
    assert body["status"] == "COMPLETED" and body["output"] == {"value": None, "ok": 1.5}


def test_runsync_waits_then_answers_with_the_job_running(
    server: LocalServer, gates: dict[str, threading.Event]
) -> None:
    client = server.client
    gate = open_gate(gates, "slow")
    started = time.monotonic()
    body = client.call("POST", "/runsync?wait=1000", json={"input": {"gate": gate, "n": 6}}).json()
    assert 0.9 < time.monotonic() - started < 5
    assert body["status"] == "IN_PROGRESS" and body["id"].startswith("sync-"), body
    gates[gate].set()
    assert client.wait_final(body["id"])["output"] == {"square": 36, "n": 6}
    # A job that finishes in time comes back whole, at once.
    quick = client.call("POST", "/runsync", json={"input": {"n": 4}}).json()
    assert quick["status"] == "COMPLETED" and quick["output"] == {"square": 16, "n": 4}
    assert set(quick) == {"id", "status", "delayTime", "executionTime", "workerId", "output"}


def test_results_expire_and_jobs_can_be_listed_and_deleted(tmp_path: Path) -> None:
    recorder = Recorder()
    with local_server(
        gated_handler(recorder, {}), tmp_path / "jobs.sqlite3", result_ttl_s=1.5
    ) as server:
        client = server.client
        job_id = client.run({"n": 3})
        assert client.wait_final(job_id)["status"] == "COMPLETED"
        listed = client.call("GET", "/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [job_id] and listed[0]["executionTime"] >= 0
        time.sleep(1.6)
        assert client.call("GET", f"/status/{job_id}").status_code == 404
        assert client.call("GET", "/jobs").json()["total"] == 0

        kept = client.run({"n": 1})
        client.wait_final(kept)
        deleted = client.call("DELETE", f"/jobs/{kept}")
        assert deleted.json() == {
            "id": kept,
            "status": "COMPLETED",
            "deleted": True,
            "stopped": False,
        }
        assert client.call("GET", f"/status/{kept}").status_code == 404
        assert client.call("DELETE", f"/jobs/{kept}").status_code == 404


# ----------------------------------------------------------------------------------------------
# Webhooks, API key, bad requests


class WebhookReceiver:
    """A loopback HTTP server that answers 500 to the first `failures` posts of each path."""

    def __init__(self, failures: int) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.path, body))
                tries = sum(1 for path, _ in received if path == self.path)
                self.send_response(500 if tries <= failures else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.posts if p == path]


def test_webhook_delivered_with_bounded_retries(tmp_path: Path) -> None:
    receiver = WebhookReceiver(failures=1)
    recorder = Recorder()
    try:
        with local_server(
            gated_handler(recorder, {}),
            tmp_path / "jobs.sqlite3",
            webhook_retries=2,
            webhook_retry_delay_s=0.1,
            allow_private_webhooks=True,  # the receiver is on loopback
        ) as server:
            client = server.client
            ok = client.run({"n": 9}, webhook=f"{receiver.url}/done")
            client.run({"fail": True}, webhook=f"{receiver.url}/failed")
            wait_until(lambda: len(receiver.bodies("/done")) == 2)
            wait_until(lambda: len(receiver.bodies("/failed")) == 2)
            # The body is the job's /status, retried once after the receiver's 500.
            assert receiver.bodies("/done")[-1] == client.status(ok)
            assert receiver.bodies("/done")[-1]["output"] == {"square": 81, "n": 9}
            assert receiver.bodies("/failed")[-1]["status"] == "FAILED"

        dead = WebhookReceiver(failures=99)  # never accepts: 1 try + 2 retries, then it stops
        with local_server(
            gated_handler(recorder, {}),
            tmp_path / "jobs2.sqlite3",
            webhook_retries=2,
            webhook_retry_delay_s=0.05,
            allow_private_webhooks=True,
        ) as server:
            job_id = server.client.run({"n": 1}, webhook=f"{dead.url}/x")

            def state() -> str | None:
                jobs = server.client.call("GET", "/jobs").json()["jobs"]
                return jobs[0].get("webhook", {}).get("state")

            wait_until(lambda: state() == "failed")
            time.sleep(0.3)
            assert len(dead.bodies("/x")) == 3 and job_id
        dead.server.shutdown()
    finally:
        receiver.server.shutdown()


def test_api_key_and_bad_requests_get_clear_4xx(tmp_path: Path) -> None:
    with local_server(
        gated_handler(Recorder(), {}), tmp_path / "jobs.sqlite3", max_run_bytes=2000
    ) as server:
        url = server.base_url
        good = {"input": {"n": 2}}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "}):
            response = requests.post(f"{url}/run", json=good, headers=headers, timeout=10)
            assert response.status_code == 401 and "API key" in response.json()["error"]
        assert requests.get(f"{url}/health", timeout=10).status_code == 401
        assert requests.get(f"{url}/ep/health", timeout=10).status_code == 401
        # RunPod takes the bare key as well as `Bearer <key>`.
        bare = requests.post(
            f"{url}/run", json=good, headers={"Authorization": API_KEY}, timeout=10
        )
        assert bare.status_code == 200 and bare.json()["status"] == "IN_QUEUE"

        client = server.client
        cases = [
            (b"not json", 400, "not valid JSON"),
            (b"", 400, '{"input"'),
            (b"[1, 2]", 400, "body: Input should be a valid dictionary"),
            (b'{"inputs": {}}', 400, "body.input: Field required"),
            (b'{"input": "text"}', 400, "body.input: Input should be a valid dictionary"),
            (b'{"input": {}, "webhook": "not a url"}', 400, "body.webhook"),
            (
                b'{"input": {}, "policy": {"executionTimeout": 50}}',
                400,
                "under the 5000 ms minimum",
            ),
            (b'{"input": {}, "policy": {"ttl": 5}}', 400, "body.policy.ttl"),
            (json.dumps({"input": {"x": "a" * 3000}}).encode(), 413, "2000"),
        ]
        for body, code, message in cases:
            response = client.call("POST", "/run", data=body)
            assert response.status_code == code, (body[:40], response.text)
            assert message in response.json()["error"], (body[:40], response.text)
        assert client.call("GET", "/status/no-such-job").status_code == 404
        assert "not found" in client.call("POST", "/cancel/no-such-job").json()["error"]
        limit = client.call("GET", "/jobs?limit=0")
        assert limit.status_code == 400 and "limit" in limit.json()["error"]
        unknown = client.call("GET", "/jobs?status=DONE")
        assert unknown.status_code == 400 and "DONE" in unknown.json()["error"]
        # The server is still up and serving after all that.
        assert client.wait_final(client.run({"n": 5}))["output"] == {"square": 25, "n": 5}


def test_server_without_api_key_is_open_and_cors(tmp_path: Path) -> None:
    with local_server(
        gated_handler(Recorder(), {}),
        tmp_path / "jobs.sqlite3",
        api_key=None,
        cors_origins="http://localhost:3000",
    ) as server:
        open_client = Client(server.base_url, api_key=None)
        assert open_client.wait_final(open_client.run({"n": 2}))["output"]["square"] == 4
        # A browser app on the allowed origin may call it directly.
        preflight = open_client.call(
            "OPTIONS",
            "/run",
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = requests.get(
            f"{server.base_url}/health", headers={"Origin": "http://evil.test"}, timeout=10
        )
        assert "access-control-allow-origin" not in other.headers


def test_queued_job_past_its_ttl_times_out(
    server: LocalServer, gates: dict[str, threading.Event]
) -> None:
    """policy.ttl (RunPod's floor is 10 s): a job no worker took in time ends TIMED_OUT."""
    gate = open_gate(gates, "busy")
    blocker = server.client.run({"gate": gate})
    server.client.wait_status(blocker, ("IN_PROGRESS",))
    # Through the store, to skip the 10 s floor the HTTP route enforces.
    record = server.runner.submit({"n": 1}, ttl_ms=50)
    body = server.client.wait_final(record.id)
    assert body["status"] == "TIMED_OUT" and "policy.ttl" in body["error"], body
    gates[gate].set()
    assert server.client.wait_final(blocker)["status"] == "COMPLETED"
