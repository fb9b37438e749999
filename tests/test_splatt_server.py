"""Splatt's GPU server contract (its seed's README), played by its own curl examples against
`python -m core.serve handlers.splat --app splatt`: a filebin URL served from loopback, the
`X-API-Key`, statuses in order with one 0-100 progress, the three result files, list
filters, delete removing files, and health without a key."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from core.apps.splatt import STATUSES
from core.splat.export import read_ply
from tests.conftest import HttpServer
from tests.serve_helpers import local_server
from tests.splat_scene import encode_mp4, render_views

KEY = "splatt-key-0123456789"
FPS = 7.0


@pytest.fixture()
def splatt_server(tmp_path: Path, http_server: HttpServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    from core.apps import get_app
    from core.config import get_settings
    from core.serve.loader import load_handler

    images, _k, _poses, _scene = render_views(28, seed=3)
    video = encode_mp4(images, tmp_path / "orbit.mp4", fps=FPS, crf=14).read_bytes()
    (http_server.root / "xyz").mkdir(exist_ok=True)
    (http_server.root / "xyz" / "video.mp4").write_bytes(video)
    out = tmp_path / "outputs"
    work = tmp_path / "work"
    work.mkdir()
    for key, value in {
        "OUTPUT_DIR": str(out),
        "WORK_DIR": str(work),
        "ALLOW_PRIVATE_URLS": "true",
        "FETCH_RETRIES": "0",
        "PROGRESS_MIN_INTERVAL_S": "0.1",
        "SPLATT_API_KEY": KEY,
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("RESULT_PATH", "BUCKET_NAME", "BUCKET_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    handler, _ = load_handler("handlers.splat")
    with local_server(handler, tmp_path / "jobs.sqlite3", get_app("splatt")) as server:
        yield server, out
    get_settings.cache_clear()


def test_splatt_backend_contract(splatt_server: Any, http_server: HttpServer) -> None:
    server, out = splatt_server
    base = server.base_url
    headers = {"X-API-Key": KEY}

    # Health check (no auth required).
    health = requests.get(f"{base}/health", timeout=10)
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy" and body["gpu_available"] is False
    assert body["active_jobs"] == 0 and body["queued_jobs"] == 0 and "gpu_info" in body

    submit = {
        "task_id": "test-001",
        "filebin_url": f"{http_server.base_url}/xyz/video.mp4",
        "filename": "test.mp4",
        "iterations": 40,
        "fps": FPS,
        "train_max_side": 96,  # ours, beside Splatt's fields: keeps the CPU run short
    }
    assert requests.post(f"{base}/jobs", json=submit, timeout=10).status_code == 401
    wrong = requests.post(f"{base}/jobs", json=submit, headers={"X-API-Key": "no"}, timeout=10)
    assert wrong.status_code == 401
    created = requests.post(f"{base}/jobs", json=submit, headers=headers, timeout=10)
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["status"] == "queued" and job["message"] and job["job_id"]
    job_id = job["job_id"]

    seen: list[str] = []
    progress: list[int] = []
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = requests.get(f"{base}/jobs/{job_id}/status", headers=headers, timeout=10).json()
        assert status["job_id"] == job_id and status["task_id"] == "test-001"
        assert 0 <= status["progress"] <= 100 and status["created_at"] <= status["updated_at"]
        if not seen or seen[-1] != status["status"]:
            seen.append(status["status"])
        progress.append(status["progress"])
        if status["status"] == "training" and "Step" in status["message"]:
            assert status["message"].startswith("Training Gaussian Splat... Step ")
            assert status["message"].endswith("/40")
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.05)
    assert status["status"] == "completed", status
    order = [STATUSES.index(s) for s in seen]
    assert order == sorted(order), seen  # never backwards
    assert {"running_colmap", "training", "completed"} <= set(seen), seen
    assert progress == sorted(progress) and progress[-1] == 100, progress
    assert status["error"] is None and status["message"] == "Pipeline completed successfully!"
    results = status["results"]
    assert results["ply_rgb_url"] == f"/jobs/{job_id}/results/baked_splat.ply"
    assert results["ply_sh_url"] == f"/jobs/{job_id}/results/baked_splat_sh.ply"
    assert results["transforms_json"]["frames"]
    # Splatt downloaded the URL as given, never `<url>/<filename>`.
    assert http_server.hits.get("/xyz/video.mp4", 0) >= 1
    assert "/xyz/video.mp4/test.mp4" not in http_server.hits

    # The three result files, as its curl example downloads them.
    files = {}
    for name in ("transforms.json", "baked_splat.ply", "baked_splat_sh.ply"):
        got = requests.get(f"{base}/jobs/{job_id}/results/{name}", headers=headers, timeout=30)
        assert got.status_code == 200, (name, got.text[:300])
        files[name] = got.content
    assert files["transforms.json"].startswith(b"{") and b"frames" in files["transforms.json"]
    for name, rest in (("baked_splat.ply", 0), ("baked_splat_sh.ply", 15)):
        assert files[name].startswith(b"ply\nformat binary_little_endian 1.0\n")
        path = server.settings.db_path.parent / name
        path.write_bytes(files[name])
        ply = read_ply(path)
        assert ply["sh_rest"].shape[1] == rest and np.isfinite(ply["means"]).all()
    assert (
        requests.get(f"{base}/jobs/{job_id}/results/baked_splat.ply", timeout=10).status_code == 401
    )
    for name in ("cameras.json", "..%2F..%2Fjobs.sqlite3", "thumbnail.jpg", "x"):
        got = requests.get(f"{base}/jobs/{job_id}/results/{name}", headers=headers, timeout=10)
        assert got.status_code == 404, name
    assert (
        requests.get(f"{base}/jobs/nonesuch/status", headers=headers, timeout=10).status_code == 404
    )

    # A job that fails (the bin holds no such file): `failed`, with its error.
    broken = {**submit, "task_id": "test-002", "filebin_url": f"{http_server.base_url}/none.mp4"}
    failed_id = requests.post(f"{base}/jobs", json=broken, headers=headers, timeout=10).json()[
        "job_id"
    ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        failed = requests.get(f"{base}/jobs/{failed_id}/status", headers=headers, timeout=10).json()
        if failed["status"] == "failed":
            break
        time.sleep(0.1)
    assert failed["status"] == "failed" and failed["error"], failed
    assert failed["message"].startswith("Pipeline failed: ") and failed["results"] is None

    # List, with the status filter and the limit.
    listed = requests.get(f"{base}/jobs", headers=headers, timeout=10).json()
    assert listed["total"] == 2 and {j["job_id"] for j in listed["jobs"]} == {job_id, failed_id}
    done = requests.get(f"{base}/jobs?status=completed", headers=headers, timeout=10).json()
    assert [j["job_id"] for j in done["jobs"]] == [job_id] and done["total"] == 1
    bad = requests.get(f"{base}/jobs?status=failed", headers=headers, timeout=10).json()
    assert [j["job_id"] for j in bad["jobs"]] == [failed_id]
    assert requests.get(f"{base}/jobs?status=training", headers=headers).json()["total"] == 0
    limited = requests.get(f"{base}/jobs?limit=1", headers=headers, timeout=10).json()
    assert len(limited["jobs"]) == 1 and limited["total"] == 2
    assert requests.get(f"{base}/jobs?status=nonsense", headers=headers).status_code == 422
    assert requests.get(f"{base}/jobs", timeout=10).status_code == 401

    # Delete: the job and its files go.
    folder = out / "test-001"
    assert {p.name for p in folder.iterdir()} >= {"baked_splat.ply", "baked_splat_sh.ply"}
    assert requests.delete(f"{base}/jobs/{job_id}", timeout=10).status_code == 401
    deleted = requests.delete(f"{base}/jobs/{job_id}", headers=headers, timeout=10)
    assert deleted.status_code == 200 and deleted.json() == {"message": "Job deleted successfully"}
    assert not folder.exists()
    assert requests.get(f"{base}/jobs/{job_id}/status", headers=headers).status_code == 404
    assert requests.get(f"{base}/jobs", headers=headers).json()["total"] == 1


def test_splatt_request_as_given() -> None:
    from core.apps.splatt import to_native
    from core.errors import InvalidInput

    native = to_native(
        {
            "task_id": "abc-123",
            "filebin_url": "https://filebin.net/xyz/video.mp4",
            "filename": "construction site.mp4",
            "iterations": 5000,
            "fps": 4,
            "start_sec": 0.0,
            "end_sec": None,
        }
    )
    assert native["video"] == "https://filebin.net/xyz/video.mp4"  # not .../construction...
    assert native["output_folder"] == "abc-123" and native["iterations"] == 5000
    for bad, where in (({"filebin_url": None}, "filebin_url"), ({"filebin_url": 3}, "filebin_url")):
        with pytest.raises(InvalidInput, match=where):
            to_native(bad)


class FakeGateway:
    """The JobGateway protocol with one completed Splatt job whose files are in S3 (or, for
    the escape check, a path outside OUTPUT_DIR)."""

    def __init__(self, artifacts: list[dict[str, Any]]) -> None:
        from core.apps.base import JobView

        now = time.time()
        self.jobs = {
            "j1": JobView(
                id="j1",
                status="COMPLETED",
                input={"task_id": "t1", "filebin_url": "https://x/v.mp4", "filename": "v.mp4"},
                progress=None,
                output={"artifacts": artifacts},
                error=None,
                created_at=now,
                updated_at=now,
            )
        }

    async def run_and_wait(self, job_input: dict[str, Any], timeout_s: float) -> Any:
        raise NotImplementedError

    def submit(self, job_input: dict[str, Any]) -> str:
        raise NotImplementedError

    def job(self, job_id: str) -> Any:
        return self.jobs.get(job_id)

    def list_jobs(self, limit: int, offset: int = 0) -> tuple[list[Any], int]:
        return list(self.jobs.values()), len(self.jobs)

    def delete(self, job_id: str) -> Any:
        return self.jobs.pop(job_id, None)

    def counts(self) -> dict[str, int]:
        return {"IN_PROGRESS": 2, "IN_QUEUE": 1}

    def api_key(self) -> str | None:
        return "server-key"


def test_results_stream_from_s3_and_delete_removes_objects(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from core.apps.splatt import routes
    from core.config import get_settings

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("SPLATT_API_KEY", raising=False)  # the server's key then
    get_settings.cache_clear()
    # A GPU, as core.system reports one (this machine has none).
    gpu = {"available": True, "name": "NVIDIA A100", "memory_total": 42949672960}
    monkeypatch.setattr("core.apps.splatt.cuda_facts", lambda: gpu)
    client = s3_server.client()
    body = b"ply\nformat binary_little_endian 1.0\n" + bytes(range(256)) * 4096
    client.put_object(Bucket=s3_server.bucket, Key="t1/baked_splat.ply", Body=body)
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    artifacts = [
        {
            "name": "baked_splat.ply",
            "storage": "s3",
            "bucket": s3_server.bucket,
            "key": "t1/baked_splat.ply",
        },
        {"name": "transforms.json", "storage": "local", "path": str(outside)},
    ]
    app = FastAPI()
    app.include_router(routes(FakeGateway(artifacts)))
    try:
        with TestClient(app) as http:
            health = http.get("/health").json()
            assert health == {
                "status": "healthy",
                "active_jobs": 2,
                "queued_jobs": 1,
                "gpu_available": True,
                "gpu_info": {"name": "NVIDIA A100", "memory_total": 42949672960},
            }
            key = {"X-API-Key": "server-key"}
            assert http.get("/jobs/j1/results/baked_splat.ply").status_code == 401
            got = http.get("/jobs/j1/results/baked_splat.ply", headers=key)
            assert got.status_code == 200 and got.content == body
            # A recorded path outside OUTPUT_DIR is never served.
            assert http.get("/jobs/j1/results/transforms.json", headers=key).status_code == 404
            assert http.delete("/jobs/j1", headers=key).status_code == 200
            listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix="t1/")
            assert listed.get("KeyCount", 0) == 0
            assert outside.exists()  # not ours to delete
            assert http.get("/jobs/j1/status", headers=key).status_code == 404
    finally:
        get_settings.cache_clear()
