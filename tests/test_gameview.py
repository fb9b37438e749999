"""Game View as its studio app drives it: the trigger body (`production_id`, `experience_id`,
`source_videos`, `settings`, `callback_url`) as a splat job's input, two source clips of one
scene in one reconstruction (one camera per clip), its output names under `production_id`,
and the callback it reads, signed (Standard Webhooks), on success and on failure."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from core.apps import gameview
from core.splat.export import read_ply
from tests.conftest import HttpServer, run_worker, worker_env
from tests.splat_scene import encode_mp4, render_views

SECRET = "whsec_" + base64.b64encode(b"game-view-test-secret-012345").decode()
FPS = 7.0


@dataclass
class Receiver:
    url: str
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail_first: int = 0


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    """Game View's callback route on loopback: records each POST (headers, body); answers 503
    to the first `fail_first` calls."""
    box = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            box.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
            failing = len(box.calls) <= box.fail_first
            self.send_response(503 if failing else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    box.url = f"http://127.0.0.1:{server.server_address[1]}/api/productions/callback"
    yield box
    server.shutdown()


def trigger(http_server: HttpServer, names: list[str], **settings: Any) -> dict[str, Any]:
    return {
        "production_id": "prod-7",
        "experience_id": "exp-3",
        "source_videos": [
            {"url": f"{http_server.base_url}/gv/{name}", "filename": name, "size": 1}
            for name in names
        ],
        "settings": {
            "totalSteps": 40,
            "maxSplats": 5000,
            "fps": FPS,
            "imagePercentage": 50,
            "duration": 10,
            **settings,
        },
        "callback_url": "",
    }


def verified(call: tuple[dict[str, str], bytes]) -> dict[str, Any]:
    headers, body = call
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
    payload = Webhook(SECRET).verify(body, headers)
    assert isinstance(payload, dict)
    return payload


def test_translation_names_its_fields() -> None:
    body = {
        "production_id": "p1",
        "experience_id": "e1",
        "source_videos": [{"url": "https://x/a.mp4"}, {"url": "https://x/b.mp4"}],
        "settings": {"totalSteps": 5000, "maxSplats": 5_000_000, "fps": 5, "duration": 300},
        "callback_url": "https://studio.example/api/callback",
    }
    native = gameview.to_native(body)
    assert native["videos"] == ["https://x/a.mp4", "https://x/b.mp4"]
    assert native["iterations"] == 5000 and native["max_gaussians"] == 5_000_000
    assert native["fps"] == 5 and native["end_sec"] == 300 and native["output_folder"] == "p1"
    assert native["artifact_names"] == {"ply": "scene.ply"}
    for bad, where in (
        ({**body, "production_id": "../x"}, "production_id"),
        ({**body, "source_videos": []}, "source_videos"),
        ({**body, "source_videos": [{"filename": "a.mp4"}]}, "source_videos[0].url"),
        ({**body, "settings": {"totalSteps": "many"}}, "settings.totalSteps"),
        ({**body, "settings": {"maxSplats": 1.5}}, "settings.maxSplats"),
        ({**body, "callback_url": "ftp://x/y"}, "callback_url"),
    ):
        with pytest.raises(Exception, match=where.replace("[", r"\[").replace("]", r"\]")):
            gameview.to_native(bad)


def test_two_clips_one_splat_and_signed_callbacks(
    tmp_path: Path, weights_dir: Path, http_server: HttpServer, receiver: Receiver
) -> None:
    images, _k, _poses, _scene = render_views(28, seed=3)
    folder = http_server.root / "gv"
    folder.mkdir(exist_ok=True)
    encode_mp4(images[:14], folder / "cam-a.mp4", fps=FPS, crf=14)
    encode_mp4(images[14:], folder / "cam-b.mp4", fps=FPS, crf=14)
    out, work = tmp_path / "outputs", tmp_path / "work"
    work.mkdir()
    env = worker_env(
        weights_dir,
        tmp_path,
        OUTPUT_DIR=str(out),
        WORK_DIR=str(work),
        ALLOW_PRIVATE_URLS="true",
        FETCH_RETRIES="0",
        PUBLIC_BASE_URL="https://cdn.example/production-outputs",
        CALLBACK_SIGNING_SECRET=SECRET,
        CALLBACK_RETRIES="2",
    )
    receiver.fail_first = 1  # the first delivery fails: retried
    job = {
        **trigger(http_server, ["cam-a.mp4", "cam-b.mp4"]),
        "callback_url": receiver.url,
        "train_max_side": 96,  # ours, beside the app's fields: keeps the CPU run short
    }
    run = run_worker(job, env, handler="handlers/splat.py", timeout=900)
    assert run.returncode == 0, run.output[-3000:]
    result = run.result
    assert result["success"] is True and result["production_id"] == "prod-7"
    assert result["frames"]["per_video"][0] >= 10 and result["frames"]["per_video"][1] >= 10
    assert result["training"]["iterations"] == 40
    assert any("imagePercentage" in w for w in result["warnings"])
    artifacts = {a["name"]: a for a in result["artifacts"]}
    assert {"scene.ply", "cameras.json", "thumbnail.jpg"} <= set(artifacts)
    for name in ("scene.ply", "cameras.json", "thumbnail.jpg"):
        assert Path(artifacts[name]["path"]) == (out / "prod-7" / name).resolve()
    ply = read_ply(out / "prod-7" / "scene.ply")
    assert ply["sh_rest"].shape[1] == 15 and np.isfinite(ply["means"]).all()

    # Both clips are in the one reconstruction, each with a camera of its own.
    cameras = json.loads((out / "prod-7" / "cameras.json").read_text())
    focal: dict[str, set[float]] = {}
    for camera in cameras:
        focal.setdefault(camera["img_name"][:3], set()).add(camera["fx"])
    assert set(focal) == {"v00", "v01"}, focal
    assert all(len(f) == 1 for f in focal.values()) and len(set().union(*focal.values())) == 2

    # The callback: retried after the 503, signed, Game View's payload.
    assert len(receiver.calls) == 2
    first, second = (verified(c) for c in receiver.calls)
    assert first == second
    assert receiver.calls[0][0]["webhook-id"] == receiver.calls[1][0]["webhook-id"]
    base = "https://cdn.example/production-outputs/prod-7"
    assert second == {
        "success": True,
        "production_id": "prod-7",
        "experience_id": "exp-3",
        "outputs": {
            "plyUrl": f"{base}/scene.ply",
            "camerasUrl": f"{base}/cameras.json",
            "thumbnailUrl": f"{base}/thumbnail.jpg",
        },
        "error": None,
    }
    tampered = dict(receiver.calls[1][0], **{"webhook-id": "msg_other"})
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(receiver.calls[1][1], tampered)

    # A job that fails (a source video is missing) calls back too, with success false.
    receiver.calls.clear()
    receiver.fail_first = 0
    failing = {**trigger(http_server, ["cam-a.mp4", "gone.mp4"]), "callback_url": receiver.url}
    run = run_worker(failing, env, handler="handlers/splat.py", timeout=300)
    assert run.result["error_code"] == "fetch_failed", run.output[-2000:]
    assert len(receiver.calls) == 1
    payload = verified(receiver.calls[0])
    assert payload["success"] is False and payload["outputs"] is None
    assert payload["production_id"] == "prod-7" and payload["experience_id"] == "exp-3"
    assert "source_videos" in payload["error"] or "videos[1]" in payload["error"]


def test_callback_to_a_private_address_is_refused(
    tmp_path: Path, weights_dir: Path, http_server: HttpServer, receiver: Receiver
) -> None:
    """Without ALLOW_PRIVATE_URLS the callback to loopback is never sent."""
    env = worker_env(weights_dir, tmp_path, OUTPUT_DIR=str(tmp_path / "o"), FETCH_RETRIES="0")
    job = {**trigger(http_server, ["a.mp4"]), "callback_url": receiver.url}
    run = run_worker(job, env, handler="handlers/splat.py", timeout=300)
    assert run.result["error_code"] in ("invalid_input", "fetch_failed"), run.output[-2000:]
    assert receiver.calls == []
    assert "callback not sent" in run.output


def test_splat_worker_health_task(tmp_path: Path, weights_dir: Path) -> None:
    run = run_worker({"task": "health"}, worker_env(weights_dir, tmp_path), "handlers/splat.py")
    assert run.returncode == 0, run.output[-2000:]
    health = run.result
    assert health["status"] == "ok" and health["worker"] == "splat"
    assert {"runpod", "torch", "pycolmap"} <= set(health["versions"])
    assert health["device"] == "cpu" and health["cuda"]["available"] is False
    assert health["gpu"] == {"name": None, "memory_total": None}
