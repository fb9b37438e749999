"""The project's own workers under the local endpoint server: the splat worker (progress from
its pipeline in /status, and a cancel that really stops training) and the infer worker (its
start-up preloading, then jobs)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.serve.loader import load_handler, run_startup
from tests.conftest import REPO
from tests.serve_helpers import local_server, wait_until


@pytest.fixture()
def worker_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Settings for jobs run in this process (core.config reads them once per process)."""
    import core.apps
    import core.models
    from core.config import get_settings

    work = tmp_path / "work"
    work.mkdir()
    for key in list(os.environ):
        if key.startswith("BUCKET_") or key in ("OUTPUT_DIR", "RESULT_PATH", "PRELOAD_MODELS"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("WORK_DIR", str(work))
    monkeypatch.setenv("PROGRESS_MIN_INTERVAL_S", "0.2")
    monkeypatch.setenv("ALLOW_MODEL_DOWNLOADS", "false")
    monkeypatch.setenv("VOLUME_WEIGHTS_DIR", str(tmp_path / "no-volume"))

    def reset() -> None:
        get_settings.cache_clear()
        core.models._registry = None
        core.models.worker_device.cache_clear()

    reset()
    yield work
    reset()


def cpu_seconds_per_second(window: float) -> float:
    """This process's CPU time over `window` seconds of wall time."""
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(window)
    return (time.process_time() - cpu) / (time.monotonic() - wall)


def test_cancel_stops_a_running_splat_job(
    worker_settings: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler, module = load_handler("handlers.splat")
    run_startup(module)
    job_input = json.loads((REPO / "examples" / "splat" / "test_input.json").read_text())["input"]
    job_input["iterations"] = 100_000  # hours on this CPU: only a cancel ends it in time
    job_input["max_frames"] = 12  # a shorter SfM before training starts

    with local_server(handler, tmp_path / "jobs.sqlite3") as server:
        updates: list[tuple[float, dict[str, Any]]] = []
        report = server.runner._report_progress

        def spy(job: dict[str, Any], update: Any) -> None:
            # Every update the pipeline sends, even those the server drops after the cancel.
            updates.append((time.monotonic(), update))
            report(job, update)

        server.runner._report_progress = spy  # type: ignore[method-assign]
        job = server.endpoint().run(job_input)

        def training() -> dict[str, Any] | None:
            body = server.client.status(job.job_id)
            output = body.get("output") or {}
            return body if output.get("stage") == "training" and output["step"] >= 3 else None

        seen = wait_until(training, timeout=150, every=0.1)
        assert seen["status"] == "IN_PROGRESS" and seen["output"]["message"].endswith("/100000")
        busy = cpu_seconds_per_second(0.5)

        caplog.set_level(logging.INFO, logger="serve.runner")
        assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
        cancelled_at = time.monotonic()
        health = server.client.wait_idle(timeout=20)  # the worker thread has returned
        stopped_in = time.monotonic() - cancelled_at
        idle = cpu_seconds_per_second(1.0)

        steps = [u["step"] for t, u in updates if u.get("stage") == "training" and "step" in u]
        late = [u for t, u in updates if t > cancelled_at + 3.0]
        print(
            json.dumps({"stopped_in_s": round(stopped_in, 2), "cpu_busy": busy, "cpu_idle": idle})
        )
        assert stopped_in < 10, stopped_in
        assert late == [], late  # no training step (or any stage) after the cancel
        assert max(steps) < 1_000  # stopped early: nowhere near 100000
        # Training kept this process busy; after the cancel it is idle (the machine may be
        # shared, so relative to what the process got while training).
        assert busy > 0.1 and idle < busy / 4, (busy, idle)
        assert health["workers"] == {"idle": 1, "running": 0, "stopping": 0}
        body = server.client.status(job.job_id)
        assert body["status"] == "CANCELLED" and "output" not in body
        assert list(worker_settings.iterdir()) == []  # the job's temporary files are removed
        assert any("returned after it was cancelled" in r.getMessage() for r in caplog.records)


def test_infer_worker_preloads_at_start_then_serves(
    worker_settings: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.models

    monkeypatch.setenv("WEIGHTS_DIR", str(REPO / "weights"))
    monkeypatch.setenv("PRELOAD_MODELS", "object-detection=shapes-yolo11.pt")
    handler, module = load_handler("handlers.infer")
    assert core.models._registry is None or not core.models.get_registry().loaded()
    run_startup(module)  # what the worker's main() does before taking jobs
    preloaded = [m["name"] for m in core.models.get_registry().loaded()]
    assert preloaded == ["shapes-yolo11.pt"]

    with local_server(handler, tmp_path / "jobs.sqlite3") as server:
        endpoint = server.endpoint()
        health = endpoint.run_sync({"task": "health"}, timeout=60)
        assert [m["name"] for m in health["loaded_models"]] == preloaded
        job_input = json.loads((REPO / "test_input.json").read_text())["input"]
        result = endpoint.run_sync(job_input, timeout=120)
        labels = sorted(d["label"] for d in result["results"][0]["detections"])
        assert labels == ["circle", "square"], result
        assert "load_model" not in result["timings_ms"] or result["timings_ms"]["load_model"] < 50
        # Bad input fails the job with the worker's error code; the server keeps serving.
        job = endpoint.run({"task": "no-such-task"})
        body = server.client.wait_final(job.job_id, timeout=30)
        assert body["status"] == "FAILED" and body["output"]["error_code"] == "unsupported_task"
        assert body["error"].startswith("unsupported_task:")
