"""Orbit's five-stage job, played as its client plays it against
`python -m core.serve handlers.infer --app orbit` (the seed's routes), plus its quality gates
and mode decision on metrics built to sit on each side of the PRD's thresholds."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests

from core.apps.orbit import BOUNDS, STAGES, decide, to_native
from core.errors import InvalidInput
from tests.serve_helpers import wait_until

# --------------------------------------------------------------------------------------------
# Gates and modes (PRD B and E)


def good_quality() -> dict[str, dict[str, Any]]:
    return {
        "mask": {"score": 0.9, "pose_risk": False, "severe_jitter": False},
        "pose": {
            "score": 0.95,
            "inlier_ratio": 0.6,
            "median_reprojection_error": 0.8,
            "good_coverage_frame_percent": 0.9,
            "jitter_score": 0.1,
            "registered": 48,
            "total": 48,
        },
        "track": {"num_tracks_kept": 300, "median_lifespan": 40, "median_confidence": 0.9},
        "depth": {"temporal_consistency": 0.9, "edge_stability": 0.8},
    }


def with_change(section: str, **values: Any) -> dict[str, dict[str, Any]]:
    quality = good_quality()
    quality[section].update(values)
    return quality


@pytest.mark.parametrize(
    ("quality", "mode"),
    [
        (good_quality(), "full-orbit"),
        (with_change("pose", registered=10), "render-only"),  # under 30 % registered
        (with_change("pose", inlier_ratio=0.34), "micro-parallax"),
        (with_change("pose", median_reprojection_error=2.1), "micro-parallax"),
        (with_change("pose", good_coverage_frame_percent=0.59), "micro-parallax"),
        (with_change("pose", jitter_score=0.51), "micro-parallax"),
        (with_change("track", num_tracks_kept=49), "2.5d-subject"),
        (with_change("track", median_lifespan=14), "2.5d-subject"),
        (with_change("track", median_confidence=0.59), "2.5d-subject"),
        (with_change("depth", temporal_consistency=0.69), "2.5d-subject"),
        (with_change("depth", edge_stability=0.59), "2.5d-subject"),
        (with_change("mask", severe_jitter=True), "2.5d-subject"),
        # Pose decides first: a failed pose gate outranks the subject's gates.
        ({**with_change("pose", inlier_ratio=0.2), "track": {}}, "micro-parallax"),
    ],
)
def test_mode_follows_the_prd_decision_tree(quality: dict[str, Any], mode: str) -> None:
    decision = decide(quality, long_side=1280, median_depth=5.0)
    assert decision.mode == mode
    for key in ("maxYaw", "maxPitch", "maxRoll", "maxTranslation"):
        assert decision.bounds[key] == BOUNDS[mode][key]
    assert decision.reasons


def test_bounds_follow_the_prd_and_the_scene_depth() -> None:
    full = decide(good_quality(), long_side=1920, median_depth=4.0)
    assert (full.bounds["maxYaw"], full.bounds["maxPitch"], full.bounds["maxRoll"]) == (20, 10, 3)
    assert full.bounds["maxTranslation"] == 0.10
    # 2 % of the median scene depth, in the solve's units.
    assert full.bounds["maxTranslationSceneUnits"] == pytest.approx(0.08)
    micro = decide(with_change("pose", jitter_score=0.9), 1920, 4.0)
    assert micro.bounds["maxTranslationSceneUnits"] == pytest.approx(0.08 * 0.3)
    # The reprojection threshold scales with resolution above 1080p-class frames.
    four_k = decide(with_change("pose", median_reprojection_error=3.5), 3840, 4.0)
    assert four_k.mode == "full-orbit"
    assert decide(with_change("pose", median_reprojection_error=3.5), 1920, 4.0).mode == (
        "micro-parallax"
    )
    assert decide(with_change("pose", registered=0), 1920, None).bounds["maxYaw"] == 0


# --------------------------------------------------------------------------------------------
# The request


def test_orbit_request_shapes_become_one_clip_source() -> None:
    clicks = [{"x": 10, "y": 20}]
    native = to_native({"video_id": "vid_0123abcd", "prompt_points": clicks})
    assert native["video"] == "upload://vid_0123abcd" and native["task"] == "sam2-segmentation"
    assert native["options"]["fps"] == 10.0 and native["options"]["max_frames"] == 150
    native = to_native({"frames": ["AAAA"], "width": 64, "height": 48, "prompt_points": clicks})
    assert "fps" not in native["options"]  # frames are all kept
    native = to_native({"video_url": "https://example.com/a.mp4", "prompt_points": clicks})
    assert native["video"] == "https://example.com/a.mp4"
    with pytest.raises(InvalidInput, match="one way"):
        to_native({"frames": ["AAAA"], "video_id": "vid_1", "prompt_points": clicks})
    with pytest.raises(InvalidInput, match="got none"):
        to_native({"frames": None, "prompt_points": clicks})
    with pytest.raises(ValueError, match="video_id"):
        to_native({"video_id": "../../etc/passwd", "prompt_points": clicks})
    with pytest.raises(InvalidInput, match=r"prompt_points\.0"):
        to_native({"video_id": "vid_1", "prompt_points": [{"x": 1}]})


def test_upload_ids_read_only_the_upload_folder(tmp_path: Path, monkeypatch: Any) -> None:
    from core.config import Settings
    from core.payload import load_payload

    settings = Settings(upload_dir=tmp_path / "uploads")
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "vid_1").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 100)
    (tmp_path / "secret").write_bytes(b"no")
    assert load_payload("upload://vid_1", settings, field="video").data.startswith(b"\x00")
    for bad in ("upload://../secret", "upload://", "upload://a/b"):
        with pytest.raises(InvalidInput, match="upload id"):
            load_payload(bad, settings, field="video")
    with pytest.raises(InvalidInput, match="no upload 'vid_2'"):
        load_payload("upload://vid_2", settings, field="video")


# --------------------------------------------------------------------------------------------
# The client, end to end


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from tests.orbit_scene import orbit_clip
    from tests.splat_scene import encode_mp4

    # Short (SAM 2 costs seconds a frame on a CPU): the known-scene test below has the tracks
    # that live the 15 frames the track gate asks for.
    clip = orbit_clip(10, width=320, height=240, fps=12.0, with_background=False)
    path = tmp_path_factory.mktemp("orbit") / "creator.mp4"
    return encode_mp4(clip.frames, path, fps=12.0, crf=12), clip


@pytest.fixture()
def orbit_server(tmp_path: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from core.apps import get_app
    from core.config import get_settings
    from core.serve.loader import load_handler
    from scripts.make_test_weights_depth import make_depth_checkpoint
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint
    from tests.serve_helpers import local_server

    make_sam2_checkpoint(weights_dir, "sam2.1_hiera_tiny.pt")
    if not (weights_dir / "depth-anything-v2-small").exists():
        make_depth_checkpoint(weights_dir)
    for key, value in {
        "WEIGHTS_DIR": str(weights_dir),
        "OUTPUT_DIR": str(tmp_path / "outputs"),
        "UPLOAD_DIR": str(tmp_path / "uploads"),
        "WORK_DIR": str(tmp_path),
        "ORBIT_SAM2_MODEL": "sam2.1_hiera_tiny.pt",
        "PROGRESS_MIN_INTERVAL_S": "0",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("RESULT_PATH", "BUCKET_NAME", "BUCKET_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    handler, _ = load_handler("handlers.infer")
    with local_server(handler, tmp_path / "jobs.sqlite3", get_app("orbit"), api_key=None) as s:
        yield s
    get_settings.cache_clear()


def poll(base: str, job_id: str, until: set[str], timeout: float) -> list[dict[str, Any]]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/get_job_status", params={"job_id": job_id}, timeout=10)
        assert body.status_code == 200, body.text
        seen.append(body.json())
        if seen[-1]["status"] in until:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {seen[-1] if seen else None} after {timeout} s")


def test_orbit_client_end_to_end(orbit_server: Any, clip_mp4: tuple[Path, Any]) -> None:
    base = orbit_server.base_url
    path, clip = clip_mp4
    health = requests.get(f"{base}/health", timeout=10).json()
    assert health == {"status": "healthy", "service": "orbit-backend", "version": "1.0.0"}

    # The app's path for a real clip: upload, then submit by video_id.
    with path.open("rb") as handle:
        uploaded = requests.post(
            f"{base}/upload_video", files={"file": ("clip.mp4", handle, "video/mp4")}, timeout=30
        )
    assert uploaded.status_code == 200, uploaded.text
    video_id = uploaded.json()["video_id"]
    assert uploaded.json()["size_bytes"] == path.stat().st_size
    bad = requests.post(f"{base}/upload_video", files={"file": ("x.exe", b"MZ")}, timeout=10)
    assert bad.status_code == 400 and "Invalid file type" in bad.json()["error"]

    centre = np.argwhere(clip.masks[0]).mean(axis=0)  # (row, col) of the subject
    submit = {
        "video_id": video_id,
        "width": clip.width * 2,  # the app's own 2x space: clicks scale to the frames
        "height": clip.height * 2,
        "target_fps": 12,
        "orbit": {"depth_input_size": 140},  # ours, beside Orbit's fields: a short CPU run
        "prompt_points": [{"x": float(centre[1] * 2), "y": float(centre[0] * 2)}],
    }
    created = requests.post(f"{base}/submit_job", json=submit, timeout=10)
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "pending"
    job_id = created.json()["job_id"]
    refused = requests.post(f"{base}/submit_job", json={"video_id": "../x"}, timeout=10)
    assert refused.status_code == 400 and refused.json()["error_code"] == "invalid_input"

    statuses = poll(base, job_id, {"completed", "failed", "cancelled"}, timeout=400)
    final = statuses[-1]
    assert final["status"] == "completed", final
    assert final["stage"] == "completed" and final["progress"] == 100.0
    running = [s for s in statuses if s["status"] == "processing"]
    stages = [s["stage"] for s in running]
    order = [STAGES.index(s) for s in stages]
    assert order == sorted(order), stages  # stages in Orbit's order
    assert len(set(stages)) >= 3, stages  # the poll saw most of them go by
    progress = [s["progress"] for s in running]
    assert progress == sorted(progress), progress  # one 0-100 for the whole job, never back
    for body in statuses:
        assert {"job_id", "status", "stage", "progress", "message", "created_at", "updated_at"} <= (
            set(body)
        )
        assert body["created_at"].endswith("Z")

    result = requests.get(f"{base}/get_job_result", params={"job_id": job_id}, timeout=10).json()
    assert result["job_id"] == job_id and result["status"] == "completed"
    assert result["mode"] in BOUNDS
    assert set(result["bounds"]) >= {"maxYaw", "maxPitch", "maxRoll", "maxTranslation"}
    assert set(result["quality"]) >= {"mask", "pose", "track", "depth", "gate_results"}
    assets = result["assets"]
    frame_count = result["frame_count"]
    assert frame_count == 10
    assert len(assets["masks"]) == len(assets["depth"]) == frame_count

    def fetch(url: str) -> bytes:
        response = requests.get(url, timeout=10)
        assert response.status_code == 200, (url, response.text[:200])
        return response.content

    for url in assets["masks"]:
        mask = cv2.imdecode(np.frombuffer(fetch(url), np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (clip.height, clip.width)
        assert set(np.unique(mask)) <= {0, 255}  # PRD A: lossless 0/255
    for url in assets["depth"]:
        depth = cv2.imdecode(np.frombuffer(fetch(url), np.uint8), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16 and depth.shape == (clip.height, clip.width)
    poses = requests.get(assets["poses"], timeout=10).json()
    assert len(poses["poses"]) == frame_count
    assert [p["frame_index"] for p in poses["poses"]] == [
        f["frame_index"] for f in result["frames"]
    ]
    for pose in poses["poses"]:
        if pose["registered"]:
            transform = np.array(pose["transform"]).reshape(4, 4)
            assert np.allclose(transform[3], [0, 0, 0, 1])
    # Random-weight SAM 2 makes a blob over most of the frame: the gates must say so (the
    # run on true masks, below, shows the stages through to a solved camera).
    quality = result["quality"]
    if quality["pose"]["registered"] < 0.3 * frame_count:
        assert result["mode"] == "render-only"
    tracks = requests.get(assets["tracks"], timeout=10).json()
    assert len(tracks["tracks"]) == quality["track"]["num_tracks_kept"]
    sources = {f["frame_index"] for f in result["frames"]}
    for track in tracks["tracks"]:
        assert {p["frame_index"] for p in track["points"]} <= sources
        for point in track["points"]:  # in the clip's own pixels
            assert 0 <= point["x"] <= clip.width and 0 <= point["y"] <= clip.height
    quality_file = requests.get(assets["quality"], timeout=10).json()
    assert quality_file["mode"] == result["mode"]

    # A second job, sent as RunPod's /run with the submit body as input, cancelled in its
    # heaviest stage: its slot frees within a few seconds and both jobs are listed.
    client = orbit_server.client
    second = client.run({**submit, "prompt_points": submit["prompt_points"]})
    poll(base, second, {"processing"}, timeout=60)
    timings = result["timings_ms"]
    heaviest = max((s for s in timings if s in STAGES), key=lambda s: timings[s])
    seen = poll_stage(base, second, heaviest, timeout=300)
    assert seen["stage"] == heaviest
    cancelled = requests.post(f"{base}/cancel_job", params={"job_id": second}, timeout=10)
    assert cancelled.json() == {"cancelled": True, "job_id": second}
    started = time.monotonic()
    endpoint = orbit_server.endpoint()  # RunPod's health: Orbit's own /health has no workers
    wait_until(lambda: endpoint.health()["workers"]["running"] == 0, timeout=15, every=0.1)
    freed_in = time.monotonic() - started
    assert freed_in < 10, freed_in
    listed = requests.get(f"{base}/list_jobs", timeout=10).json()["jobs"]
    by_id = {job["job_id"]: job for job in listed}
    assert by_id[job_id]["status"] == "completed" and by_id[second]["status"] == "cancelled"
    missing = requests.get(f"{base}/get_job_status", params={"job_id": "job_nope"}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"] == "Job not found"


def poll_stage(base: str, job_id: str, stage: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/get_job_status", params={"job_id": job_id}, timeout=10).json()
        if body["stage"] == stage or body["status"] != "processing":
            return body
        time.sleep(0.05)
    raise AssertionError(f"{job_id} never reached {stage}")


def test_frames_shape_still_works_inline(
    inprocess: Any, weights_dir: Path, monkeypatch: Any
) -> None:
    """The seed's body: base64 frames, clicks in the app's space; the job runs to a mode."""
    from scripts.make_test_weights_depth import make_depth_checkpoint
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint
    from tests.orbit_scene import orbit_clip

    make_sam2_checkpoint(weights_dir, "sam2.1_hiera_tiny.pt")
    if not (weights_dir / "depth-anything-v2-small").exists():
        make_depth_checkpoint(weights_dir)
    monkeypatch.setenv("ORBIT_SAM2_MODEL", "sam2.1_hiera_tiny.pt")
    clip = orbit_clip(4, width=96, height=72, with_background=False)
    frames = [base64.b64encode(cv2.imencode(".png", f)[1].tobytes()).decode() for f in clip.frames]
    result = inprocess(
        {
            "frames": frames,
            "width": 96,
            "height": 72,
            "fps": 12,
            "prompt_points": [{"x": 40, "y": 40}],
            "orbit": {"depth_input_size": 70},
        }
    )
    assert "error" not in result, result
    assert result["frame_count"] == 4 and result["mode"] in BOUNDS
    # Inline storage: every asset is a data URI the client can open.
    assert all(uri.startswith("data:image/png;base64,") for uri in result["assets"]["masks"])


def data_uri_bytes(uri: str) -> bytes:
    assert uri.startswith("data:"), uri[:40]
    return base64.b64decode(uri.split(",", 1)[1])


def test_orbit_job_on_a_known_scene(inprocess: Any, weights_dir: Path, monkeypatch: Any) -> None:
    """The job's stages composed on a rendered clip with known cameras, SAM 2's masks replaced
    by the true ones (what trained weights would give; ours are random): the camera path comes
    back, tracks pass the gate, every asset opens, and the gates read the metrics."""
    import json

    import core.stages.segment
    from scripts.make_test_weights_depth import make_depth_checkpoint
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint
    from tests.orbit_scene import orbit_clip
    from tests.splat_scene import encode_mp4, pose_errors

    make_sam2_checkpoint(weights_dir, "sam2.1_hiera_tiny.pt")
    if not (weights_dir / "depth-anything-v2-small").exists():
        make_depth_checkpoint(weights_dir)
    monkeypatch.setenv("ORBIT_SAM2_MODEL", "sam2.1_hiera_tiny.pt")
    clip = orbit_clip(24, width=320, height=240, arc_deg=60.0, fps=12.0, with_background=False)
    video = encode_mp4(clip.frames, weights_dir.parent / "known.mp4", fps=12.0, crf=10)

    def true_masks(loaded: Any, frames: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        return [clip.masks[frame.index] for frame in frames]

    monkeypatch.setattr(core.stages.segment, "segment_subject", true_masks)
    centre = np.argwhere(clip.masks[0]).mean(axis=0)
    result = inprocess(
        {
            "video": base64.b64encode(video.read_bytes()).decode(),
            "target_fps": 12,
            "prompt_points": [{"x": float(centre[1]), "y": float(centre[0])}],
            "orbit": {"depth_input_size": 140, "sfm_features": 2048},
        }
    )
    assert "error" not in result, result
    assert result["frame_count"] == 24
    gates = result["quality"]["gate_results"]
    assert gates["pose"]["passed"], result["quality"]["pose"]
    assert gates["track"]["passed"], result["quality"]["track"]
    assert result["mode"] in ("full-orbit", "2.5d-subject")  # depth's random weights may fail
    assert result["quality"]["mask"]["pose_risk"] is False
    poses = json.loads(data_uri_bytes(result["assets"]["poses"]))
    registered = [p for p in poses["poses"] if p["registered"]]
    assert len(registered) == 24
    c2w = [np.array(p["transform"]).reshape(4, 4) for p in registered]
    errors = pose_errors(
        [m[:3, :3].T for m in c2w],
        np.array([m[:3, 3] for m in c2w]),
        [rot for rot, _ in clip.poses],
        clip.centres,
    )
    assert errors["centre_rms"] < 0.03 * clip.path_length, errors
    # On a 24-frame arc, focal trades against SIMPLE_RADIAL's distortion (seen 0.5-6 % off,
    # threads make COLMAP nondeterministic); a wrong scale into the clip's pixels is 2x off.
    assert poses["camera"]["fx"] == pytest.approx(clip.k[0, 0], rel=0.1)
    bounds = result["bounds"]
    assert bounds["maxTranslationSceneUnits"] == pytest.approx(
        (bounds["maxTranslation"] / 0.10) * 0.02 * bounds["medianSceneDepth"], rel=1e-3
    )
    tracks = json.loads(data_uri_bytes(result["assets"]["tracks"]))
    assert len(tracks["tracks"]) == result["quality"]["track"]["num_tracks_kept"] >= 50
    on_subject = sum(1 for t in tracks["tracks"] if t["on_subject"])
    assert 0 < on_subject < len(tracks["tracks"])
    for uri in result["assets"]["depth"]:
        depth = cv2.imdecode(np.frombuffer(data_uri_bytes(uri), np.uint8), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16 and depth.shape == (240, 320)
    for uri, truth in zip(result["assets"]["masks"], clip.masks, strict=True):
        mask = cv2.imdecode(np.frombuffer(data_uri_bytes(uri), np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask > 0, truth)
