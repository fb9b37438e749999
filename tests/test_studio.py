"""The Perception Concept Studio on our worker, played as its client plays it.

Its proxy (`api/hf-inference.ts`) sends `{task, model, payloadBase64, mimeType, options}` with
one fixed model name per task and `mimeType` often `application/octet-stream`; its frontend
(`Playground.tsx`) reads a list of `{score, label, box, mask_polygon, keypoints}` for the YOLO
tasks, `{concepts, instances}` for SAM 3 on an image, `depth_image`, and `annotated_video` with
`metrics` for velocity and SAM 3 on a clip. Each task goes through the RunPod SDK's local mode
and through the old backend's `POST /infer` on our local server (`--app studio`), and what the
frontend reads is checked against our native result for the same pixels.

The weights are the Studio's names: `yolo26n.pt` is our trained shapes detector under that
name (so detections are real), the seg and pose YOLO26 checkpoints are random weights built
from Ultralytics' yaml, Depth Anything V1 Small a random `save_pretrained` folder, RAFT large a
random state dict, SAM 3 a random checkpoint of its real architecture. `yolo11n.pt`, velocity's
default detector, is the shapes detector too, so the clip's shapes are tracked.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from scripts.synthetic_shapes import render_scene
from tests.conftest import REPO, SHAPES_MODEL, jpeg_b64, run_worker, worker_env
from tests.serve_helpers import local_server
from tests.test_video_tasks import mp4_b64, needs_shapes, synthetic_clip

pytestmark = needs_shapes

STUDIO_MODELS = {
    "object-detection": "yolo26n.pt",
    "image-segmentation": "yolo26n-seg.pt",
    "pose-estimation": "yolo26n-pose.pt",
    "sam3-concept-segmentation": "sam3.pt",
    "depth-estimation": "LiheYoung/depth-anything-small-hf",
    "velocity-estimation": "raft-large",
}
SAM3_IMGSZ = 224  # SAM 3 at 1008 px takes minutes per frame on 2 CPU cores
# Random-weight YOLO26 scores ~0.0002: threshold 0 (the Studio's slider goes to 0), 5 at most.


@pytest.fixture(scope="module")
def studio_weights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from scripts.make_test_weights import STUDIO_YOLO_NAMES, make_yolo_checkpoints
    from scripts.make_test_weights_depth import V1_FOLDER, make_depth_checkpoint
    from scripts.make_test_weights_raft import make_raft_checkpoint

    folder = tmp_path_factory.mktemp("studio-weights")
    make_yolo_checkpoints(folder, names=STUDIO_YOLO_NAMES[1:])  # seg and pose, from yaml
    shutil.copy(SHAPES_MODEL, folder / "yolo26n.pt")
    shutil.copy(SHAPES_MODEL, folder / "yolo11n.pt")
    make_depth_checkpoint(folder, folder_name=V1_FOLDER)
    make_raft_checkpoint(folder, large=True)
    subprocess.run(  # in a child process: its 4 GB peak leaves with it
        [sys.executable, str(REPO / "scripts" / "make_test_weights_sam3.py"), str(folder)],
        check=True,
        timeout=900,
        capture_output=True,
    )
    yield folder
    (folder / "sam3.pt").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    scene, _ = render_scene(3, width=320, height=240)
    clip = synthetic_clip(frame_count=8)
    return {
        "image": jpeg_b64(scene),
        "video": mp4_b64(clip, tmp_path_factory.mktemp("studio-clip") / "clip.mp4"),
    }


def studio_request(task: str, payload: str, **options: Any) -> dict[str, Any]:
    """As `api/hf-inference.ts` forwards it."""
    return {
        "task": task,
        "model": STUDIO_MODELS[task],
        "payloadBase64": payload,
        "mimeType": "application/octet-stream",
        "options": options,
    }


def requests_for(media: dict[str, str]) -> dict[str, dict[str, Any]]:
    image, video = media["image"], media["video"]
    return {
        "object-detection": studio_request("object-detection", image, threshold=0.3),
        "image-segmentation": studio_request("image-segmentation", image, threshold=0, max_det=5),
        "pose-estimation": studio_request("pose-estimation", image, threshold=0, max_det=5),
        "sam3-image": studio_request(
            "sam3-concept-segmentation", image, threshold=0.0, text_prompt="", imgsz=SAM3_IMGSZ
        ),
        "sam3-video": studio_request(
            "sam3-concept-segmentation",
            video,
            threshold=0.0,
            text_prompt="circle, square",
            imgsz=SAM3_IMGSZ,
            max_frames=3,
        ),
        "depth-estimation": studio_request("depth-estimation", image, threshold=0.3),
        "velocity-estimation": studio_request(
            "velocity-estimation",
            video,
            threshold=0.5,
            max_frames=121,
            max_pairs=120,
            meter_per_pixel=0.05,
            imgsz=640,
        ),
    }


def native_of(request: dict[str, Any]) -> dict[str, Any]:
    """The same pixels in our own shape: what the Studio's answer must agree with."""
    return {**request, "response_format": "native"}


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


# ----------------------------------------------------------------------------------------------
# What the frontend reads, checked against our native result


def read_as_frontend(case: str, response: Any, native: dict[str, Any]) -> None:
    task = native["task"]
    if task in ("object-detection", "image-segmentation", "pose-estimation"):
        assert isinstance(response, list)
        ours = native["results"][0]["detections"]
        assert len(response) == len(ours) > 0, (case, native)
        for item, detection in zip(response, ours, strict=True):
            box = item["box"]
            assert [round(box[k], 2) for k in ("xmin", "ymin", "xmax", "ymax")] == [
                round(v, 2) for v in detection["box"]
            ]
            assert item["score"] == detection["confidence"] and item["label"] == detection["label"]
            if task == "image-segmentation":
                polygon = item["mask_polygon"]
                assert len(polygon) > 2 and all(len(p) == 2 for p in polygon)
                flat = [v for p in polygon for v in p]
                assert flat in detection["mask"]["polygons"]  # the same mask, as pairs
            if task == "pose-estimation":
                assert [tuple(k) for k in item["keypoints"]] == [
                    (k["x"], k["y"], k["confidence"]) for k in detection["keypoints"]
                ]
                assert len(item["keypoints"]) == 17
        return
    if case == "sam3-image":
        assert response["concepts"] == ["person"]  # an empty text_prompt means "person"
        ours = native["results"][0]["detections"]
        assert [i["score"] for i in response["instances"]] == [d["confidence"] for d in ours]
        for item, detection in zip(response["instances"], ours, strict=True):
            assert [item["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == detection["box"]
        return
    if case == "sam3-video":
        assert "instances" not in response  # the frontend's image branch would win
        assert response["concepts"] == ["circle", "square"]
        assert response["content_type"] == "video/mp4"
        assert base64.b64decode(response["annotated_video"])[4:8] == b"ftyp"
        frames = native["frames"]
        assert response["metrics"] == {
            "frames_processed": len(frames),
            "instances_detected_total": sum(len(f["detections"]) for f in frames),
        }
        return
    if task == "depth-estimation":
        depth8 = decode_png(response["depth_image"])
        assert depth8.dtype == np.uint8 and depth8.ndim == 2
        depth16 = decode_png(native["results"][0]["depth"]["data"])
        assert depth8.shape == depth16.shape == (240, 320)
        assert np.array_equal(depth8, (depth16 >> 8).astype(np.uint8))
        assert depth8.max() == 255 and depth8.min() == 0  # min-max over the image
        return
    if task == "velocity-estimation":
        assert response["content_type"] == "video/mp4"
        assert base64.b64decode(response["annotated_video"])[4:8] == b"ftyp"
        velocity = response["velocity"]
        assert velocity["mode"] == "per_track" and velocity["meter_per_pixel"] == 0.05
        frames = native["frames"]
        assert len(velocity["data"]) == len(frames) == response["metrics"]["frames_processed"]
        for studio_frame, frame in zip(velocity["data"], frames, strict=True):
            # RAFT on the CPU differs in the last digit between processes.
            studio_speeds = [t["speed_mps_est"] for t in studio_frame["tracks"]]
            speeds = [t["speed_mps"] for t in frame["tracks"]]
            assert [s is None for s in studio_speeds] == [s is None for s in speeds]
            assert [s for s in studio_speeds if s is not None] == pytest.approx(
                [s for s in speeds if s is not None], rel=1e-3
            )
        speeds = [t["speed_mps_est"] for f in velocity["data"] for t in f["tracks"]]
        assert any(s is not None and s > 0 for s in speeds)  # the shapes were tracked
        assert all(isinstance(v, int | float) for v in response["metrics"].values())
        assert native["flow"]["model"] == "raft_large.pth"
        return
    raise AssertionError(case)


@pytest.fixture(scope="module")
def native_results(
    studio_weights: Path, media: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Our own results for every case, in this process (one model load each)."""
    import core.apps
    import core.models
    from core.config import get_settings

    env = worker_env(studio_weights, tmp_path_factory.mktemp("studio-native"))
    with pytest.MonkeyPatch.context() as patch:
        for key in ("WEIGHTS_DIR", "VOLUME_WEIGHTS_DIR", "ALLOW_MODEL_DOWNLOADS"):
            patch.setenv(key, env[key])
        patch.delenv("RESULT_PATH", raising=False)
        get_settings.cache_clear()
        core.models._registry = None
        results = {}
        for case, request in requests_for(media).items():
            result = core.apps.run_infer({"id": f"native-{case}", "input": native_of(request)})
            assert "error" not in result, (case, result)
            results[case] = result
        get_settings.cache_clear()
        core.models._registry = None
    return results


@pytest.mark.parametrize(
    "case",
    [
        "object-detection",
        "image-segmentation",
        "pose-estimation",
        "sam3-image",
        "sam3-video",
        "depth-estimation",
        "velocity-estimation",
    ],
)
def test_studio_proxy_through_the_sdk(
    case: str,
    studio_weights: Path,
    media: dict[str, str],
    native_results: dict[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    request = requests_for(media)[case]
    run = run_worker(request, worker_env(studio_weights, tmp_path), timeout=600)
    assert run.returncode == 0 and run.result is not None, run.output[-3000:]
    read_as_frontend(case, run.result, native_results[case])


def test_old_backend_routes_on_the_local_server(
    studio_weights: Path,
    media: dict[str, str],
    native_results: dict[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m core.serve handlers.infer --app studio`: POST /infer and GET /health as the
    old backend's README describes them, with its status codes."""
    import core.models
    from core.apps import get_app
    from core.config import get_settings
    from core.serve.loader import load_handler

    env = worker_env(studio_weights, tmp_path)
    for key in ("WEIGHTS_DIR", "VOLUME_WEIGHTS_DIR", "ALLOW_MODEL_DOWNLOADS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("RESULT_PATH", raising=False)
    get_settings.cache_clear()
    core.models._registry = None
    handler, _ = load_handler("handlers.infer")
    with local_server(handler, tmp_path / "jobs.sqlite3", get_app("studio")) as server:
        base = server.base_url
        import requests

        health = requests.get(f"{base}/health", timeout=10)  # no key: the old backend had none
        assert health.status_code == 200
        assert health.json() == {"ok": True, "cuda": False, "tasks": list(STUDIO_MODELS)}
        for case, request in requests_for(media).items():
            response = requests.post(f"{base}/infer", json=request, timeout=600)
            assert response.status_code == 200, (case, response.text[:2000])
            read_as_frontend(case, response.json(), native_results[case])

        bad = requests.post(f"{base}/infer", json={**request, "task": "telepathy"}, timeout=30)
        assert bad.status_code == 400 and "Unsupported task: telepathy" in bad.json()["detail"]
        broken = studio_request("object-detection", base64.b64encode(b"not an image").decode())
        failed = requests.post(f"{base}/infer", json=broken, timeout=60)
        assert failed.status_code == 500
        assert failed.json()["detail"] == failed.json()["error"]
        assert "the payload is text, not an image" in failed.json()["detail"]
        missing = requests.post(f"{base}/infer", json={"task": "object-detection"}, timeout=30)
        assert missing.status_code == 422
        # RunPod's routes are still there, behind the key.
        assert requests.get(f"{base}/jobs", timeout=10).status_code == 401
        good = requests.post(f"{base}/infer", json=requests_for(media)["object-detection"])
        read_as_frontend("object-detection", good.json(), native_results["object-detection"])
    get_settings.cache_clear()
    core.models._registry = None


def test_serve_app_flag_as_a_process(tmp_path: Path) -> None:
    """`python -m core.serve handlers.infer --app studio`, for real: health without a key; an
    unknown app stops the server at once with a clear line."""
    import requests

    from tests.serve_helpers import start_server_process

    server = start_server_process("handlers.infer", tmp_path, SERVE_APP="studio")
    try:
        health = requests.get(f"{server.client.base_url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["ok"] is True
        assert health.json()["tasks"] == list(STUDIO_MODELS)
    finally:
        server.stop()
    wrong = subprocess.run(
        [sys.executable, "-m", "core.serve", "handlers.infer", "--app", "nonesuch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 2 and "unknown app 'nonesuch'" in wrong.stderr + wrong.stdout
