"""Hostile and unusual requests, and RunPod's own conventions, each closed at its root: strict
numbers, bounded times, deep JSON, data URIs at and over the limit, one model per file whatever
its spelling, safe names, RunPod's virtual-host bucket URL, its cached hub models, and several
jobs per worker through the real SDK. Each case is followed by a good request answered right."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import tracemalloc
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    S3Server,
    jpeg_b64,
    run_worker,
    scene_image,
    worker_env,
)
from tests.serve_helpers import local_server

GOOD_IMAGE = jpeg_b64(scene_image(320, 240, seed=11))
JPEG = base64.b64decode(GOOD_IMAGE)


def detect(image: Any = GOOD_IMAGE, **options: Any) -> dict[str, Any]:
    return {"task": "object-detection", "image": image, "options": {"threshold": 0.0, **options}}


def boxes(result: dict[str, Any]) -> list[list[float]]:
    assert "error" not in result, result
    return [d["box"] for d in result["results"][0]["detections"]]


# ----------------------------------------------------------------------------------------------
# Strict numbers, finite and bounded times


def test_booleans_are_not_numbers_and_times_are_finite(inprocess, tmp_path: Path) -> None:
    from tests.test_media import make_video

    good = boxes(inprocess(detect(max_det=5)))
    video = base64.b64encode(make_video(tmp_path / "clip.mp4", frames=3).read_bytes()).decode()
    clip = {"task": "object-detection", "video": video}
    cases = [
        (detect(threshold=True), "options.threshold: must be a number"),
        (detect(max_det=True), "options.max_det: must be a number"),
        (detect(classes=[True]), "options.classes: must be a number"),
        ({**clip, "options": {"start_sec": float("inf")}}, "options.start_sec"),
        ({**clip, "options": {"start_sec": 1e308}}, "options.start_sec"),
        ({**clip, "options": {"end_sec": float("nan")}}, "options.end_sec"),
        ({**detect(), "fps": True}, "fps: must be a number"),
    ]
    for job_input, message in cases:
        result = inprocess(job_input)
        assert result.get("error_code") == "invalid_input", (job_input["options"], result)
        assert message in result["error"], result["error"]
        assert boxes(inprocess(detect(max_det=5))) == good
    # Booleans where booleans belong still work, and 1 is still a number.
    assert boxes(inprocess({**detect(max_det=5, agnostic_nms=True), "annotate": False}))
    assert "results" in inprocess(detect(threshold=1))


def test_splat_request_refuses_booleans_and_unsafe_folders(inprocess) -> None:
    from core.apps import run_splat

    for job_input, message in [
        ({"video": "aGVsbG8=", "iterations": True}, "iterations: must be a number"),
        ({"video": "aGVsbG8=", "start_sec": float("inf")}, "start_sec"),
        ({"video": "aGVsbG8=", "output_folder": ".."}, "output_folder"),
        ({"video": "aGVsbG8=", "artifact_names": {"ply": "../x.ply"}}, "artifact_names"),
        ({"filebin_url": "https://example.com/v.mp4", "task_id": ".."}, "task_id"),
        ({"filebin_url": "https://example.com/v.mp4", "task_id": "."}, "task_id"),
        ({"filebin_url": "https://example.com/v.mp4", "task_id": "a/b"}, "task_id"),
    ]:
        result = run_splat({"id": "j", "input": job_input})
        assert result.get("error_code") == "invalid_input", (job_input, result)
        assert message in result["error"], result["error"]


def test_splatt_task_id_dot_dot_cannot_leave_output_dir(weights_dir: Path, tmp_path: Path) -> None:
    """Through the SDK, as Splatt sends it: refused at once, nothing written beside OUTPUT_DIR."""
    out = tmp_path / "outputs"
    out.mkdir()
    env = worker_env(weights_dir, tmp_path, OUTPUT_DIR=str(out), ALLOW_PRIVATE_URLS="true")
    job = {"task_id": "..", "filebin_url": "http://127.0.0.1:9/bin", "filename": "v.mp4"}
    run = run_worker(job, env, handler="handlers/splat.py", timeout=120)
    assert run.result is not None and run.result["error_code"] == "invalid_input", run.output
    assert "task_id" in run.result["error"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["result.json"]
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Data URIs and base64 at and over the limit


def test_data_uri_forms_and_the_exact_limit(
    inprocess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    good = boxes(inprocess(detect(max_det=5)))
    upper = inprocess(detect(f"DATA:image/jpeg;BASE64,{GOOD_IMAGE}", max_det=5))
    assert boxes(upper) == good  # RFC 2397: both are case-insensitive
    percent = "data:image/jpeg," + urllib.parse.quote_from_bytes(JPEG)
    assert boxes(inprocess(detect(percent, max_det=5))) == good

    # Exactly MAX_INPUT_BYTES is allowed, one byte more is not, padded or not.
    for padded in (GOOD_IMAGE, GOOD_IMAGE.rstrip("=")):
        monkeypatch.setenv("MAX_INPUT_BYTES", str(len(JPEG)))
        inprocess.reset()
        assert boxes(inprocess(detect(padded, max_det=5))) == good
        monkeypatch.setenv("MAX_INPUT_BYTES", str(len(JPEG) - 1))
        inprocess.reset()
        result = inprocess(detect(padded, max_det=5))
        assert result["error_code"] == "payload_too_large", result
        result = inprocess(detect(percent, max_det=5))
        assert result["error_code"] == "payload_too_large", result
    monkeypatch.delenv("MAX_INPUT_BYTES")
    inprocess.reset()
    assert boxes(inprocess(detect(max_det=5))) == good


def test_percent_encoded_data_uri_is_sized_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 9 MB percent-encoded URI over the limit is refused without decoding it, and one under
    the limit decodes in bounded memory (not one Python object per byte)."""
    from core.config import Settings
    from core.errors import PayloadTooLarge
    from core.payload import load_payload

    data = os.urandom(3 * 1024 * 1024)
    uri = "data:application/octet-stream," + "".join(f"%{b:02X}" for b in data)  # 9 MiB of text
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match="MAX_INPUT_BYTES"):
            load_payload(uri, Settings(max_input_bytes=1024 * 1024), field="image")
        refused_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        payload = load_payload(uri, Settings(max_input_bytes=4 * 1024 * 1024), field="image")
        decoded_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert payload.data == data
    # A few copies of the text at most; unquote_to_bytes on the whole text took ~80 times it.
    assert refused_peak < 3 * len(uri)
    assert decoded_peak < 5 * len(uri)


# ----------------------------------------------------------------------------------------------
# JSON nested deep, at the local server


def test_deep_json_is_a_400_and_the_server_stays_up(tmp_path: Path) -> None:
    def handler(job: dict[str, Any]) -> dict[str, Any]:
        return {"echo": job["input"]}

    with local_server(handler, tmp_path / "jobs.sqlite3") as server:
        deep = '{"input": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"
        for route in ("/run", "/runsync"):
            response = server.client.call("POST", route, data=deep)
            assert response.status_code == 400, response.text
            assert "nests 100002 levels deep" in response.json()["error"]
        job_id = server.client.run({"fine": [[1, 2], {"b": "[[[ not brackets"}]})
        assert server.client.wait_final(job_id)["output"] == {
            "echo": {"fine": [[1, 2], {"b": "[[[ not brackets"}]}
        }


# ----------------------------------------------------------------------------------------------
# One model per file, whatever the spelling


def test_one_model_per_file_whatever_the_spelling(inprocess) -> None:
    import core.models

    results = [
        inprocess({**detect(max_det=5), "model": name})
        for name in ("yolo11n.pt", "./yolo11n.pt", ".//yolo11n.pt", "./././yolo11n.pt")
    ]
    assert all(boxes(r) == boxes(results[0]) for r in results)
    loaded = [m for m in core.models.get_registry().loaded() if m["path"].endswith("yolo11n.pt")]
    assert len(loaded) == 1, loaded


# ----------------------------------------------------------------------------------------------
# RunPod's conventions: a virtual-host bucket URL, cached hub models


@pytest.fixture()
def virtual_host_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """`*.s3.us-east-1.example.test` resolves to loopback, as the bucket's host would resolve."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".example.test"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_virtual_host_bucket_url_names_the_bucket(
    inprocess, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, virtual_host_dns: None
) -> None:
    from core.config import get_settings
    from core.storage import BucketTarget

    port = urllib.parse.urlsplit(s3_server.endpoint_url).port
    # moto (in this process) must know the stand-in domain for an S3 endpoint, as AWS's is.
    monkeypatch.setenv("MOTO_S3_CUSTOM_ENDPOINTS", f"http://s3.us-east-1.example.test:{port}")
    monkeypatch.setenv(
        "BUCKET_ENDPOINT_URL", f"http://{s3_server.bucket}.s3.us-east-1.example.test:{port}"
    )
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", s3_server.secret_key)
    inprocess.reset()
    target = BucketTarget.from_settings(get_settings())
    assert target is not None
    assert (target.bucket, target.region) == (s3_server.bucket, "us-east-1")
    assert target.endpoint_url == f"http://s3.us-east-1.example.test:{port}"
    result = inprocess({**detect(max_det=5), "annotate": True}, job_id="vhost-1")
    preview = result["results"][0]["preview"]
    assert preview["storage"] == "s3" and preview["bucket"] == s3_server.bucket
    stored = s3_server.client().get_object(Bucket=s3_server.bucket, Key=preview["key"])
    assert stored["Body"].read()[:3] == b"\xff\xd8\xff"


def test_runpod_cached_hub_model_is_a_weights_location(
    inprocess, weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Depth Anything from RunPod's model cache (`models--ORG--NAME/snapshots/<commit>/`),
    with no copy in WEIGHTS_DIR and downloads off."""
    from scripts.make_test_weights_depth import make_depth_checkpoint

    cache = tmp_path / "huggingface-cache" / "hub"
    repo = cache / "models--depth-anything--Depth-Anything-V2-Small-hf"
    snapshot = repo / "snapshots" / "0123abcd"
    made = make_depth_checkpoint(tmp_path / "made")
    snapshot.parent.mkdir(parents=True)
    made.rename(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    empty = tmp_path / "empty-weights"
    empty.mkdir()
    job = {"task": "depth-estimation", "image": GOOD_IMAGE}

    monkeypatch.setenv("WEIGHTS_DIR", str(empty))
    monkeypatch.setenv("HUB_CACHE_DIR", str(tmp_path / "elsewhere"))
    inprocess.reset()
    missing = inprocess(job)
    assert missing["error_code"] == "model_unavailable"
    assert "models--depth-anything--Depth-Anything-V2-Small-hf" in missing["error"]

    monkeypatch.setenv("HUB_CACHE_DIR", str(cache))
    inprocess.reset()
    result = inprocess(job)
    assert "error" not in result, result
    import core.models

    assert [m["path"] for m in core.models.get_registry().loaded()] == [str(snapshot)]


# ----------------------------------------------------------------------------------------------
# Several jobs per worker, through the real SDK against a stand-in for RunPod's job API


class FakeJobApi:
    """RunPod's job-take and job-done routes on loopback, plus an image route that holds each
    request until `together` requests are in flight at once (or a timeout)."""

    def __init__(self, jobs: list[dict[str, Any]], together: int) -> None:
        self.pending = list(jobs)
        self.results: dict[str, Any] = {}
        self.batch_sizes: list[int] = []
        self.together = together
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                if url.path.startswith("/image"):
                    api.serve_image(self)
                    return
                if not url.path.startswith(("/job-take/", "/job-take-batch/")):
                    self.send_response(204)  # job-stop polls, pings: nothing to say
                    self.end_headers()
                    return
                size = int(query.get("batch_size", ["1"])[0])
                with api.lock:
                    api.batch_sizes.append(size)
                    taken, api.pending = api.pending[:size], api.pending[size:]
                if not taken:
                    time.sleep(0.2)
                    self.send_response(204)
                    self.end_headers()
                    return
                body = json.dumps(taken if "batch" in url.path else taken[0]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length) or b"{}")
                job_id = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["id"][0]
                with api.lock:
                    api.results[job_id] = payload
                    api.lock.notify_all()
                self.send_response(200)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve_image(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.lock.notify_all()
            self.lock.wait_for(lambda: self.most_in_flight >= self.together, timeout=20)
            self.in_flight -= 1
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(JPEG)))
        handler.end_headers()
        handler.wfile.write(JPEG)

    def env(self) -> dict[str, str]:
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.url}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.url}/job-done/test-worker?id=$ID&gpu=test",
            "RUNPOD_AI_API_KEY": "test-key",
            "RUNPOD_POD_ID": "test-worker",
            "RUNPOD_PING_INTERVAL": "60000",
        }


@pytest.fixture()
def job_api() -> Iterator[FakeJobApi]:
    jobs = [
        {"id": f"job-{n}", "input": {**detect(max_det=5), "model": "shapes-yolo11.pt"}}
        for n in range(4)
    ]
    api = FakeJobApi(jobs, together=2)
    for job in api.pending:
        job["input"]["image"] = f"{api.url}/image/{job['id']}.jpg"
    yield api
    api.server.shutdown()


def test_max_concurrency_runs_jobs_side_by_side_through_the_sdk(
    job_api: FakeJobApi, weights_dir: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    env = worker_env(weights_dir, tmp_path, ALLOW_PRIVATE_URLS="true", MAX_CONCURRENCY="2")
    env.pop("RESULT_PATH")
    env.update(job_api.env())
    process = subprocess.Popen(
        [sys.executable, str(REPO / "handlers/infer.py")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with job_api.lock:
            done = job_api.lock.wait_for(lambda: len(job_api.results) == 4, timeout=240)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode(errors="replace")
    assert done, output[-3000:]
    assert max(job_api.batch_sizes) == 2  # the SDK asked for as many jobs as it may run
    assert job_api.most_in_flight == 2  # two jobs fetched their images at the same time
    outputs = [job_api.results[f"job-{n}"]["output"] for n in range(4)]
    assert all(boxes(o) == boxes(outputs[0]) for o in outputs)
    assert boxes(outputs[0])  # the shapes detector finds the scene's shapes


def test_concurrency_setting_makes_an_async_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK runs a plain function's jobs one after another on its event loop; with
    MAX_CONCURRENCY the handler becomes a coroutine that runs the job in a thread."""
    import asyncio
    import inspect

    from core.config import get_settings
    from core.worker import serverless_config

    def handler(job: dict[str, Any]) -> dict[str, Any]:
        return {"thread": threading.current_thread().name, "id": job["id"]}

    monkeypatch.delenv("MAX_CONCURRENCY", raising=False)
    get_settings.cache_clear()
    assert serverless_config(handler) == {"handler": handler}
    monkeypatch.setenv("MAX_CONCURRENCY", "3")
    get_settings.cache_clear()
    try:
        config = serverless_config(handler)
        assert config["concurrency_modifier"](1) == 3
        assert inspect.iscoroutinefunction(config["handler"])
        result = asyncio.run(config["handler"]({"id": "x"}))
        assert result["id"] == "x" and result["thread"] != threading.main_thread().name
    finally:
        get_settings.cache_clear()
