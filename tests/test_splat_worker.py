"""The splat worker end to end through the RunPod SDK's local mode (`python handlers/splat.py`):
a synthetic scene with known cameras, encoded as an mp4, -> frames -> SfM -> CPU training ->
exports -> uploads to moto's S3 server on loopback, with progress captured from the log."""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.splat.export import decode_splat, read_ply
from tests.conftest import HttpServer, S3Server, run_worker, worker_env
from tests.splat_scene import encode_mp4, pose_errors, render_views

N_VIEWS, FPS = 28, 7.0
STAGES = [
    "downloading_video",
    "extracting_frames",
    "running_colmap",
    "training",
    "exporting",
    "uploading",
]


@pytest.fixture(scope="module")
def scene_video(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[bytes, list[tuple[np.ndarray, np.ndarray]], float]:
    images, _k, poses, scene = render_views(N_VIEWS, seed=3)
    path = encode_mp4(images, tmp_path_factory.mktemp("scene") / "orbit.mp4", fps=FPS, crf=14)
    return path.read_bytes(), poses, scene.radius


def splat_env(weights_dir: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return worker_env(
        weights_dir, tmp_path, WORK_DIR=str(work), PROGRESS_MIN_INTERVAL_S="0.2", **extra
    )


def progress_updates(output: str) -> list[dict[str, Any]]:
    return [ast.literal_eval(m) for m in re.findall(r"progress: (\{.*\})", output)]


def fetch(s3: S3Server, artifact: dict[str, Any]) -> bytes:
    body = s3.client().get_object(Bucket=s3.bucket, Key=artifact["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == artifact["sha256"] and len(body) == artifact["bytes"]
    return body


def test_video_to_splat_uploaded_with_progress(
    scene_video, weights_dir: Path, tmp_path: Path, s3_server: S3Server
) -> None:
    video, poses, radius = scene_video
    job = {
        "video": base64.b64encode(video).decode(),
        "preset": "fast",
        "fps": FPS,
        "iterations": 300,
        "train_max_side": 160,
        "formats": ["ply", "splat"],
    }
    env = splat_env(weights_dir, tmp_path, **s3_server.env())
    run = run_worker(job, env, handler="handlers/splat.py", timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    result = run.result

    sfm = result["sfm"]
    assert (
        sfm["registered_images"] >= 0.9 * N_VIEWS
        and sfm["total_images"] == result["frames"]["selected"]
    )
    training = result["training"]
    print(json.dumps({"sfm": sfm, "training": training, "timings_ms": result["timings_ms"]}))
    # Training must clearly beat the untrained start on frames it never saw.
    assert training["psnr"] > training["psnr_start"] + 5.0, training

    artifacts = {a["name"]: a for a in result["artifacts"]}
    assert set(artifacts) == {
        "splat.ply",
        "scene.splat",
        "cameras.json",
        "transforms.json",
        "thumbnail.jpg",
    }
    assert all(a["storage"] == "s3" for a in artifacts.values())

    ply_path = tmp_path / "splat.ply"
    ply_path.write_bytes(fetch(s3_server, artifacts["splat.ply"]))
    ply = read_ply(ply_path)
    n = training["gaussians"]
    assert ply["means"].shape == (n, 3) and np.isfinite(ply["means"]).all()
    splat = fetch(s3_server, artifacts["scene.splat"])
    assert len(splat) == 32 * n
    np.testing.assert_allclose(decode_splat(splat)["means"][:1].shape, (1, 3))

    cameras = json.loads(fetch(s3_server, artifacts["cameras.json"]))
    transforms = json.loads(fetch(s3_server, artifacts["transforms.json"]))
    assert len(cameras) == len(transforms["frames"]) == sfm["registered_images"]
    # cameras.json (OpenCV camera-to-world) and transforms.json (OpenGL) describe one pose set.
    for camera, frame in zip(
        sorted(cameras, key=lambda c: c["img_name"]),
        sorted(transforms["frames"], key=lambda f: f["file_path"]),
        strict=True,
    ):
        c2w = np.array(frame["transform_matrix"])
        np.testing.assert_allclose(c2w[:3, 3], camera["position"], atol=1e-6)
        np.testing.assert_allclose(
            c2w[:3, :3] @ np.diag([1, -1, -1]), camera["rotation"], atol=1e-6
        )
    # The recovered centres match the rendered cameras up to a similarity transform.
    names = [int(c["img_name"].split("_")[1]) for c in cameras]
    assert names  # frame_<i>: the i-th selected frame is the i-th view at 1 frame per window
    errors = pose_errors(
        [np.array(c["rotation"]).T for c in cameras],
        np.array([c["position"] for c in cameras]),
        [poses[i][0] for i in names],
        np.array([-poses[i][0].T @ poses[i][1] for i in names]),
    )
    assert errors["centre_rms"] < 0.02 * radius, errors

    stages = [u["stage"] for u in progress_updates(run.output)]
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == STAGES
    updates = progress_updates(run.output)
    assert any(u["stage"] == "training" and "loss" in u and "step" in u for u in updates)
    assert [u["psnr"] for u in updates if "psnr" in u] == [training["psnr"]]
    assert list((tmp_path / "work").iterdir()) == []  # job files removed


def test_splatt_app_shape(
    scene_video, weights_dir: Path, tmp_path: Path, http_server: HttpServer
) -> None:
    video, _, _ = scene_video
    (http_server.root / "bin-123").mkdir(exist_ok=True)
    (http_server.root / "bin-123" / "video.mp4").write_bytes(video)
    job = {
        "task_id": "t-42",
        # As Splatt sends it: the file's own URL, downloaded as given; `filename` names it.
        "filebin_url": f"{http_server.base_url}/bin-123/video.mp4",
        "filename": "construction_site.mp4",
        "iterations": 50,
        "fps": FPS,
        "start_sec": 0,
        "end_sec": None,
        "train_max_side": 96,
    }
    out = tmp_path / "outputs"
    env = splat_env(weights_dir, tmp_path, ALLOW_PRIVATE_URLS="true", OUTPUT_DIR=str(out))
    run = run_worker(job, env, handler="handlers/splat.py", timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    artifacts = {a["name"]: a for a in run.result["artifacts"]}
    assert {"baked_splat.ply", "baked_splat_sh.ply", "transforms.json"} <= set(artifacts)
    assert run.result["task_id"] == "t-42"
    assert run.result["filename"] == "construction_site.mp4"
    assert http_server.hits["/bin-123/video.mp4"] >= 1
    baked = read_ply(artifacts["baked_splat.ply"]["path"])
    full = read_ply(artifacts["baked_splat_sh.ply"]["path"])
    assert baked["sh_rest"].shape[1] == 0 and full["sh_rest"].shape[1] == 15
    assert Path(artifacts["transforms.json"]["path"]).parent == out / "t-42"


def test_sfm_task_returns_cameras_and_points(
    scene_video, weights_dir: Path, tmp_path: Path
) -> None:
    video, _, _ = scene_video
    env = splat_env(weights_dir, tmp_path, OUTPUT_DIR=str(tmp_path / "outputs"))
    run = run_worker(
        {"task": "sfm", "video": base64.b64encode(video).decode(), "fps": FPS},
        env,
        handler="handlers/splat.py",
        timeout=600,
    )
    assert run.returncode == 0, run.output[-3000:]
    artifacts = {a["name"]: a for a in run.result["artifacts"]}
    assert set(artifacts) == {"cameras.json", "transforms.json", "points.ply", "colmap_sparse.zip"}
    assert "training" not in run.result
    points = read_ply(artifacts["points.ply"]["path"])
    assert points["means"].shape[0] == run.result["sfm"]["points"] > 100


def test_failures_are_clear_and_leave_nothing(weights_dir: Path, tmp_path: Path) -> None:
    wall = [np.full((240, 320, 3), 128, np.uint8) for _ in range(20)]
    blank = encode_mp4(wall, tmp_path / "wall.mp4", fps=10).read_bytes()
    env = splat_env(weights_dir, tmp_path)
    run = run_worker(
        {"video": base64.b64encode(blank).decode(), "fps": 5}, env, handler="handlers/splat.py"
    )
    assert run.returncode == 1 and run.result["error_code"] == "sfm_failed", run.output[-2000:]
    corrupt = run_worker(
        {"video": base64.b64encode(blank[:300]).decode()}, env, handler="handlers/splat.py"
    )
    assert corrupt.result["error_code"] == "media_decode_failed"
    both = run_worker(
        {"video": "aGVsbG8=", "images": ["aGVsbG8="]}, env, handler="handlers/splat.py"
    )
    assert both.result["error_code"] == "invalid_input" and "exactly one" in both.result["error"]
    assert list((tmp_path / "work").iterdir()) == []


def test_no_room_for_the_splat_fails_before_the_work(weights_dir: Path, tmp_path: Path) -> None:
    """No bucket, no OUTPUT_DIR, and a splat that cannot fit inline: refused at once."""
    env = splat_env(weights_dir, tmp_path, CPU_MAX_GAUSSIANS="1000000")
    run = run_worker(
        {"video": "aGVsbG8=", "max_gaussians": 1_000_000}, env, handler="handlers/splat.py"
    )
    assert run.result["error_code"] == "upload_failed", run.output[-2000:]
    assert "BUCKET_NAME" in run.result["error"] and "max_gaussians" in run.result["error"]
    assert "download" not in run.result["timings_ms"]  # nothing was fetched or computed
