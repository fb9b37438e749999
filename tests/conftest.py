"""Shared fixtures: checkpoints made here (random weights, real architectures, saved by
Ultralytics), the worker run through the RunPod SDK's local mode, a loopback HTTP server
and moto's S3 server on loopback."""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_MEDIA = REPO.parent / "shared" / "media"
SHAPES_MODEL = REPO / "weights" / "shapes-yolo11.pt"

# Offline and quiet for every Ultralytics import in this process and its children.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")


@pytest.fixture(scope="session", autouse=True)
def ultralytics_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ultralytics-config")
    os.environ["YOLO_CONFIG_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory, ultralytics_config_dir: Path) -> Path:
    """yolo11n{,-seg,-pose}.pt with random weights, saved and reloaded the Ultralytics way."""
    from scripts.make_test_weights import make_yolo_checkpoints

    path = tmp_path_factory.mktemp("weights")
    make_yolo_checkpoints(path)
    if SHAPES_MODEL.exists():
        shutil.copy(SHAPES_MODEL, path / SHAPES_MODEL.name)
    return path


def jpeg_b64(pixels: np.ndarray, quality: int = 92) -> str:
    ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return base64.b64encode(buffer.tobytes()).decode()


def scene_image(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 110, np.uint8)
    image += rng.integers(0, 30, image.shape, dtype=np.uint8)
    cv2.circle(image, (width // 3, height // 2), height // 5, (20, 40, 220), -1)
    cv2.rectangle(
        image, (width // 2, height // 4), (width // 2 + 150, height // 4 + 120), (200, 180, 30), -1
    )
    return image


@dataclass
class WorkerRun:
    returncode: int
    result: dict[str, Any] | None
    output: str


def worker_env(weights_dir: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_"))}
    env.update(
        WEIGHTS_DIR=str(weights_dir),
        VOLUME_WEIGHTS_DIR=str(tmp_path / "no-volume"),
        ALLOW_MODEL_DOWNLOADS="false",
        RESULT_PATH=str(tmp_path / "result.json"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_worker(
    job_input: dict[str, Any] | None,
    env: dict[str, str],
    handler: str = "handlers/infer.py",
    timeout: float = 300,
) -> WorkerRun:
    """`python handlers/infer.py --test_input '{"input": ...}'`: the SDK's own local mode."""
    result_path = Path(env["RESULT_PATH"])
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / handler)]
    cwd = REPO
    if job_input is not None:
        job = json.dumps({"input": job_input})
        if len(job) < 100_000:
            command += ["--test_input", job]
        else:  # over the OS's argument limit: the SDK's other local mode, test_input.json
            cwd = result_path.parent / "job"
            cwd.mkdir(exist_ok=True)
            (cwd / "test_input.json").write_text(job)
    completed = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return WorkerRun(completed.returncode, result, completed.stdout + completed.stderr)


@pytest.fixture()
def worker(weights_dir: Path, tmp_path: Path):
    def call(job_input: dict[str, Any] | None, **env_extra: str) -> WorkerRun:
        return run_worker(job_input, worker_env(weights_dir, tmp_path, **env_extra))

    return call


# ----------------------------------------------------------------------------------------------
# In-process worker, for many requests against one long-lived process


@pytest.fixture()
def inprocess(weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real job runner in this process, with settings for the test; returns a caller."""
    import core.apps
    import core.models
    from core.config import get_settings

    env = worker_env(weights_dir, tmp_path)
    for key in ("WEIGHTS_DIR", "VOLUME_WEIGHTS_DIR", "ALLOW_MODEL_DOWNLOADS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("RESULT_PATH", raising=False)
    for key in list(os.environ):
        if key.startswith("BUCKET_") or key == "OUTPUT_DIR":
            monkeypatch.delenv(key)

    def reset() -> None:
        get_settings.cache_clear()
        core.models._registry = None
        core.models.worker_device.cache_clear()

    reset()

    def call(job_input: Any, job_id: str = "test-job", **job_extra: Any) -> dict[str, Any]:
        return core.apps.run_infer({"id": job_id, "input": job_input, **job_extra})

    call.reset = reset  # type: ignore[attr-defined]
    yield call
    reset()


# ----------------------------------------------------------------------------------------------
# Loopback servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class HttpServer:
    root: Path
    base_url: str
    hits: dict[str, int]


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """Serves files from a folder; `/flaky/<n>/<file>` fails with 503 n times first,
    `/redirect?to=<url>` answers 302."""
    root = tmp_path_factory.mktemp("http-root")
    hits: dict[str, int] = {}

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path.startswith("/redirect?to="):
                self.send_response(302)
                self.send_header("Location", self.path.split("=", 1)[1])
                self.end_headers()
                return
            if self.path.startswith("/flaky/"):
                _, _, failures, name = self.path.split("/", 3)
                if hits[self.path] <= int(failures):
                    self.send_error(503)
                    return
                self.path = "/" + name
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpServer(root, f"http://127.0.0.1:{server.server_address[1]}", hits)
    server.shutdown()


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    access_key: str = "testing"
    secret_key: str = "testing"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def env(self) -> dict[str, str]:
        return {
            "BUCKET_ENDPOINT_URL": self.endpoint_url,
            "BUCKET_ACCESS_KEY_ID": self.access_key,
            "BUCKET_SECRET_ACCESS_KEY": self.secret_key,
            "BUCKET_NAME": self.bucket,
        }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server over real HTTP on loopback, reached through boto3."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(endpoint_url=f"http://127.0.0.1:{port}", bucket="worker-results")
    s3.client().create_bucket(Bucket=s3.bucket)
    yield s3
    server.stop()


def require_shared_media(name: str) -> Path:
    path = SHARED_MEDIA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real footage lives in ../shared/media beside the checkout)")
    return path
