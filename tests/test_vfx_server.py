"""The VFX platform's web API on `python -m core.serve handlers.infer --app vfx`, played as its
web UI calls it: a multipart upload to `/api/process`, `/api/job/{id}` until done with the
seed's statuses, `/health`, every project file fetched, a second job on the kept project
without a file, and unsafe names and paths refused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.serve_helpers import API_KEY, local_server
from tests.splat_scene import encode_mp4
from tests.test_vfx_job import keep_masks

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture()
def vfx_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_dir: Path) -> Any:
    from core.apps import get_app
    from core.config import get_settings
    from core.serve.loader import load_handler

    out = tmp_path / "outputs"
    for key, value in {
        "OUTPUT_DIR": str(out),
        "WEIGHTS_DIR": str(weights_dir),
        "VOLUME_WEIGHTS_DIR": str(tmp_path / "no-volume"),
        "ALLOW_MODEL_DOWNLOADS": "false",
        "PROGRESS_MIN_INTERVAL_S": "0.05",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("RESULT_PATH", "BUCKET_NAME", "BUCKET_ENDPOINT_URL", "PRELOAD_MODELS"):
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    handler, _ = load_handler("handlers.infer")
    with local_server(handler, tmp_path / "jobs.sqlite3", get_app("vfx")) as server:
        yield server, out
    get_settings.cache_clear()


def wait_done(base: str, job_id: str, timeout: float = 60) -> tuple[dict[str, Any], list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/api/job/{job_id}", headers=HEADERS, timeout=10).json()
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        if body["status"] in ("completed", "failed"):
            return body, seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {seen}")


def test_upload_status_and_every_file(vfx_server: Any, tmp_path: Path) -> None:
    server, out = vfx_server
    base = server.base_url
    assert requests.get(f"{base}/health", timeout=5).json() == {"status": "ok"}

    frames = [np.full((72, 96, 3), 30 + 20 * i, np.uint8) for i in range(10)]
    video = encode_mp4(frames, tmp_path / "plate.mp4", fps=24).read_bytes()
    files = {"file": ("plate.mp4", video, "video/mp4")}
    form = {"project_name": "Web_Shot", "stages": "ingest"}
    refused = requests.post(f"{base}/api/process", files=files, data=form, timeout=10)
    assert refused.status_code == 401

    answer = requests.post(
        f"{base}/api/process", files=files, data=form, headers=HEADERS, timeout=30
    )
    assert answer.status_code == 200, answer.text
    submitted = answer.json()
    assert submitted["status"] == "submitted" and submitted["job_id"]
    body, seen = wait_done(base, submitted["job_id"])
    assert body["status"] == "completed", body
    assert set(seen) <= {"submitted", "running", "completed"} and seen[-1] == "completed"
    result = body["result"]
    assert result["ingest"]["frame_count"] == 10 and result["project_name"] == "Web_Shot"

    listing = requests.get(
        f"{base}/api/projects/Web_Shot/files", headers=HEADERS, timeout=10
    ).json()
    paths = [f["path"] for f in listing["files"]]
    assert "source/plate.mp4" in paths and "source/manifest.json" in paths
    assert sum(p.startswith("source/frames/frame_") for p in paths) == 10
    root = out / "projects" / "Web_Shot"
    for item in listing["files"]:
        got = requests.get(f"{base}{item['url']}", headers=HEADERS, timeout=10)
        assert got.status_code == 200, item
        assert got.content == (root / item["path"]).read_bytes()
    assert (root / "source/plate.mp4").read_bytes() == video

    # A later job on the kept project: no file, a stage that reads the kept frames.
    keep_masks(
        out, "Web_Shot", [np.pad(np.ones((20, 20), bool), ((20, 32), (30, 46))) for _ in range(10)]
    )
    again = requests.post(
        f"{base}/api/process",
        files={"project_name": (None, "Web_Shot"), "stages": (None, "matte")},
        headers=HEADERS,
        timeout=10,
    ).json()
    body, _ = wait_done(base, again["job_id"])
    assert body["status"] == "completed", body
    assert body["result"]["matte"]["matte_count"] == 10
    matte = requests.get(
        f"{base}/api/projects/Web_Shot/files/matte/matte_0010.png", headers=HEADERS, timeout=10
    )
    assert matte.status_code == 200 and matte.headers["content-type"] == "image/png"


def test_refusals(vfx_server: Any) -> None:
    server, _out = vfx_server
    base = server.base_url

    def post(**form: str) -> requests.Response:
        fields = {k: (None, v) for k, v in form.items()}
        return requests.post(f"{base}/api/process", files=fields, headers=HEADERS, timeout=10)

    assert post(project_name="../etc", stages="matte").status_code == 422
    assert "paint" in post(project_name="ok", stages="matte,paint").json()["error"]
    assert "file" in post(project_name="ok", stages="ingest").json()["error"]
    not_video = requests.post(
        f"{base}/api/process",
        files={"file": ("x.mp4", b"hello", "video/mp4"), "stages": (None, "ingest")},
        headers=HEADERS,
        timeout=10,
    )
    assert not_video.status_code == 415
    assert requests.get(f"{base}/api/job/nope", headers=HEADERS, timeout=10).status_code == 404
    for path in ("..%2F..%2Fetc%2Fpasswd", "source/../../x", ".env"):
        got = requests.get(f"{base}/api/projects/ok/files/{path}", headers=HEADERS, timeout=10)
        assert got.status_code == 404, path
    assert requests.get(
        f"{base}/api/projects/..%2Fx/files", headers=HEADERS, timeout=10
    ).status_code in (404, 422)
    # A failing stage: the job completes as RunPod sees it, `failed` as the platform's client does.
    failed = post(project_name="Empty_Project", stages="colmap").json()
    body, _ = wait_done(base, failed["job_id"])
    assert body["status"] == "failed" and "no ingested frames" in body["error"]
