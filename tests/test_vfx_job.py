"""The VFX job through the infer worker's runner (`core.apps.run_infer`), as the platform's
`run_pipeline` is called: stages in order with the seed's names, projects kept and reused
without `video`, a failing stage stopping the job, job-wide progress, cancel between frames;
and, where those stages have landed, ingest + depth and the camera track on a rendered shot
with a known camera (camera_data.json and the .chan against the truth)."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.stages.project import Project
from core.stages.roto import RotoInstance, write_roto
from tests.orbit_scene import OrbitClip, orbit_clip
from tests.splat_scene import encode_mp4, umeyama

HAS_DEPTH = importlib.util.find_spec("core.stages.video_depth") is not None
HAS_CAMERA = importlib.util.find_spec("core.stages.camera") is not None


@pytest.fixture(scope="module")
def clip() -> OrbitClip:
    return orbit_clip(16, width=192, height=144, follow=False)


@pytest.fixture()
def vfx(inprocess: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Runs a VFX job in process with OUTPUT_DIR set; returns (call, output dir)."""
    import core.apps

    out = tmp_path / "out"
    monkeypatch.setenv("OUTPUT_DIR", str(out))
    monkeypatch.setenv("PROGRESS_MIN_INTERVAL_S", "0")
    inprocess.reset()
    updates: list[dict[str, Any]] = []

    def sink(_job: dict[str, Any], update: dict[str, Any]) -> None:
        updates.append(update)

    def call(job_input: dict[str, Any], job_id: str = "vfx-job") -> dict[str, Any]:
        updates.clear()
        result: dict[str, Any] = core.apps.run_infer({"id": job_id, "input": job_input}, sink)
        return result

    call.updates = updates  # type: ignore[attr-defined]
    call.out = out  # type: ignore[attr-defined]
    return call


def video_b64(frames: list[np.ndarray], path: Path, fps: float) -> str:
    return base64.b64encode(encode_mp4(frames, path, fps=fps).read_bytes()).decode()


def keep_masks(out: Path, name: str, masks: list[np.ndarray]) -> None:
    """Known subject masks in the project, as a roto run leaves them."""
    from core.config import Settings

    project = Project(name, Settings(output_dir=out), None)
    height, width = masks[0].shape
    per_frame = [[RotoInstance("person", 1, mask)] for mask in masks]
    numbers = list(range(1, len(masks) + 1))
    write_roto(per_frame, ["person"], project.root / "roto", numbers, (height, width))


def test_ingest_job_keeps_the_frames_with_job_wide_progress(vfx: Any, tmp_path: Path) -> None:
    frames = [np.full((96, 128, 3), 30 + 20 * i, np.uint8) for i in range(10)]
    result = vfx(
        {
            "project_name": "Shot_A",
            "stages": ["ingest"],
            "video": video_b64(frames, tmp_path / "a.mp4", 24),
        }
    )
    assert result["status"] == "completed", result
    ingest = result["ingest"]
    assert ingest["status"] == "completed" and ingest["frame_count"] == 10
    assert ingest["files"]["frames"] == {
        "dir": "source/frames",
        "pattern": "frame_%04d.png",
        "count": 10,
    }
    assert "task" not in result and result["project_name"] == "Shot_A"
    root = vfx.out / "projects" / "Shot_A"
    manifest = json.loads((root / "source/manifest.json").read_text())
    assert [f["source_frame"] for f in manifest["frames"]] == list(range(10))
    assert ingest["files"]["manifest"]["path"] == str((root / "source/manifest.json").resolve())
    stages = {u["stage"] for u in vfx.updates}
    assert stages == {"ingest"} and vfx.updates[-1]["progress"] == 100.0


def test_reused_project_runs_later_stages_without_video(
    vfx: Any, tmp_path: Path, clip: OrbitClip
) -> None:
    video = video_b64(clip.frames, tmp_path / "clip.mp4", clip.fps)
    first = vfx({"project_name": "Shot_B", "stages": "ingest", "video": video})
    assert first["ingest"]["frame_count"] == len(clip.frames)
    keep_masks(vfx.out, "Shot_B", clip.masks)
    second = vfx(
        {
            "project_name": "Shot_B",
            "stages": ["matte", "cleanplate"],
            "options": {"matte": {"dilate_px": 4}, "cleanplate": {"window": 4}},
        }
    )
    assert second["status"] == "completed", second
    assert second["stages"] == ["matte", "cleanplate"] and "ingest" not in second
    matte = second["matte"]
    # No ViTMatte weights in the test's WEIGHTS_DIR: the classical method, said so.
    assert matte["method"] == "guided_filter" and "ViTMatte" in matte["fallback_reason"]
    assert matte["matte_count"] == len(clip.frames)
    assert any("guided-filter fallback" in w for w in second.get("warnings", []))
    plate = second["cleanplate"]
    assert plate["cleanplate_count"] == len(clip.frames)
    assert abs(sum(plate["filled_share"].values()) - 1) < 1e-3
    root = vfx.out / "projects" / "Shot_B"
    assert len(list((root / "matte").glob("matte_*.png"))) == len(clip.frames)
    assert len(list((root / "cleanplate").glob("cleanplate_*.png"))) == len(clip.frames)
    # One progress stage per VFX stage, the job-wide percentage rising to 100.
    stages = [u["stage"] for u in vfx.updates]
    assert stages[0] == "matte" and stages[-1] == "cleanplate"
    shares = [u["progress"] for u in vfx.updates]
    assert shares == sorted(shares) and shares[-1] == 100.0
    matte_top = max(u["progress"] for u in vfx.updates if u["stage"] == "matte")
    assert 40 <= matte_top <= 60  # matte and cleanplate weigh the same

    # A new ingest: the outputs made from the old frames go.
    assert (
        vfx({"project_name": "Shot_B", "stages": ["ingest"], "video": video})["status"]
        == "completed"
    )
    assert not any((root / d).exists() for d in ("roto", "matte", "cleanplate"))
    refused = vfx({"project_name": "Shot_B", "stages": ["matte"]})
    assert (
        refused["matte"]["error_code"] == "invalid_input"
        and "run roto" in refused["matte"]["error"]
    )


def test_a_failing_stage_stops_the_job(
    vfx: Any, inprocess: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator without sam3.pt (the session's weights may hold a random-weight one).
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "no-weights"))
    inprocess.reset()
    frames = [np.full((64, 96, 3), 40 + 10 * i, np.uint8) for i in range(6)]
    video = video_b64(frames, tmp_path / "c.mp4", 24)
    result = vfx({"project_name": "Shot_C", "stages": ["ingest", "roto", "matte"], "video": video})
    assert result["status"] == "failed" and result["failed_stage"] == "roto"
    assert result["ingest"]["status"] == "completed"
    assert result["roto"]["status"] == "failed"
    assert result["roto"]["error_code"] == "model_unavailable"
    assert "sam3.pt" in result["roto"]["error"] and "matte" not in result
    assert result["stage_error_code"] == "model_unavailable"

    empty = vfx({"project_name": "Nothing_Here", "stages": ["colmap"]})
    assert empty["status"] == "failed" and empty["colmap"]["error_code"] == "invalid_input"
    assert "no ingested frames" in empty["colmap"]["error"]
    no_plate = vfx({"project_name": "Nothing_Here", "stages": ["ingest"]})
    assert (
        no_plate["ingest"]["error_code"] == "invalid_input"
        and "video" in no_plate["ingest"]["error"]
    )


def test_bad_requests_name_the_field(vfx: Any) -> None:
    cases = [
        ({"project_name": "../etc", "stages": ["ingest"]}, "project_name"),
        ({"project_name": "ok", "stages": ["ingest", "paint"]}, "paint"),
        ({"project_name": "ok", "stages": []}, "stages"),
        (
            {
                "project_name": "ok",
                "stages": ["colmap"],
                "options": {"colmap": {"quality": "ultra"}},
            },
            "colmap",
        ),
        ({"project_name": "ok", "stages": ["colmap"], "video": "AAAA"}, "video"),
    ]
    for job_input, named in cases:
        result = vfx(job_input)
        assert result.get("error_code") == "invalid_input", (job_input, result)
        assert named in result["error"], (named, result["error"])


def test_cancel_stops_between_frames(vfx: Any, tmp_path: Path, clip: OrbitClip) -> None:
    import core.apps
    from core.control import JobControl, bind

    video = video_b64(clip.frames, tmp_path / "d.mp4", clip.fps)
    assert (
        vfx({"project_name": "Shot_D", "stages": ["ingest"], "video": video})["status"]
        == "completed"
    )
    keep_masks(vfx.out, "Shot_D", clip.masks)
    control = JobControl("cancel-job", lambda *_: None)

    def sink(_job: dict[str, Any], update: dict[str, Any]) -> None:
        if update["stage"] == "cleanplate" and "frame" in update.get("message", ""):
            control.request_stop("cancelled")

    with bind(control):
        job = {"id": "cancel-job", "input": {"project_name": "Shot_D", "stages": ["cleanplate"]}}
        result = core.apps.run_infer(job, sink)
    assert result["error_code"] == "cancelled", result
    written = list((vfx.out / "projects/Shot_D/cleanplate").glob("*.png"))
    assert 1 <= len(written) < len(clip.frames)


@pytest.mark.skipif(not HAS_DEPTH, reason="core.stages.video_depth has not landed on this branch")
def test_ingest_and_depth_job(vfx: Any, tmp_path: Path, weights_dir: Path, clip: OrbitClip) -> None:
    import cv2

    from scripts.make_test_weights_depth import make_depth_checkpoint

    make_depth_checkpoint(weights_dir)
    video = video_b64(clip.frames[:8], tmp_path / "e.mp4", clip.fps)
    result = vfx(
        {
            "project_name": "Shot_E",
            "stages": ["ingest", "depth"],
            "video": video,
            "options": {"depth": {"input_size": 126}},  # small: CPU time
        }
    )
    assert result["status"] == "completed", result
    assert result["ingest"]["frame_count"] == 8 and result["depth"]["depth_count"] == 8
    root = vfx.out / "projects/Shot_E/depth"
    png = cv2.imread(str(root / "depth_0001.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None and png.dtype == np.uint16 and png.shape == (clip.height, clip.width)
    scale = json.loads((root / "depth_scale.json").read_text())
    assert scale["lo"] == result["depth"]["lo"] and scale["hi"] > scale["lo"]


@pytest.mark.skipif(not HAS_CAMERA, reason="core.stages.camera has not landed on this branch")
def test_camera_track_matches_the_known_camera(vfx: Any, tmp_path: Path) -> None:
    from core.stages.camera_export import colmap_world_to_camera, read_chan

    shot = orbit_clip(24, width=320, height=240, follow=True)
    video = video_b64(shot.frames, tmp_path / "f.mp4", shot.fps)
    assert (
        vfx({"project_name": "Shot_F", "stages": ["ingest"], "video": video})["status"]
        == "completed"
    )
    keep_masks(vfx.out, "Shot_F", shot.masks)
    result = vfx(
        {"project_name": "Shot_F", "stages": ["colmap"], "options": {"colmap": {"quality": "low"}}}
    )
    assert result["status"] == "completed", result
    colmap = result["colmap"]
    root = vfx.out / "projects/Shot_F/colmap"
    data = json.loads((root / "camera_data.json").read_text())
    assert colmap["num_cameras"] == sum(e["registered"] for e in data["frames"]) >= 20
    assert data["frame_count"] == len(shot.frames) and colmap["max_features"] == 2048
    assert [e["source_frame"] for e in data["frames"]] == list(range(len(shot.frames)))
    registered = [e for e in data["frames"] if e["registered"]]
    estimated = np.array(
        [colmap_world_to_camera(np.asarray(e["camera_to_world"])) for e in registered]
    )
    centres = np.array([-m[:3, :3].T @ m[:3, 3] for m in estimated])
    truth = shot.centres[[e["frame"] - 1 for e in registered]]
    scale, rot, trans = umeyama(centres, truth)
    aligned = (scale * (rot @ centres.T)).T + trans
    rms = float(np.sqrt(((aligned - truth) ** 2).sum(axis=1).mean()))
    assert rms < 0.02 * shot.path_length, (rms, shot.path_length)
    chan = read_chan((root / "camera.chan").read_text())
    assert sorted(chan) == [e["frame"] for e in registered]
    for entry in registered:
        assert np.allclose(chan[entry["frame"]][0], np.asarray(entry["camera_to_world"]), atol=1e-6)
    assert (root / "camera_blender.py").is_file()


def test_roto_with_sam2_prompts_writes_every_frames_masks(
    vfx: Any, tmp_path: Path, weights_dir: Path, clip: OrbitClip
) -> None:
    """SAM 2 (random weights: the masks are not accurate) from a box on frame 2: the plumbing
    from prompts to one mask file per frame per object, read back by the next stage."""
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint

    make_sam2_checkpoint(weights_dir, "sam2.1_hiera_tiny.pt")
    frames = clip.frames[:3]
    video = video_b64(frames, tmp_path / "g.mp4", clip.fps)
    ys, xs = np.nonzero(clip.masks[1])
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    result = vfx(
        {
            "project_name": "Shot_G",
            "stages": ["ingest", "roto", "matte"],
            "video": video,
            "options": {
                "roto": {"objects": [{"id": 4, "box": box, "frame_index": 2}]},
                "matte": {"method": "guided_filter"},
            },
        }
    )
    assert result["status"] == "completed", result
    roto = result["roto"]
    assert roto["mask_count"] == len(frames) and roto["model"] == "sam2.1_hiera_tiny.pt"
    assert roto["concepts"] == {"object": "object"} and roto["instances"] == {"object": ["id_4"]}
    root = vfx.out / "projects/Shot_G/roto"
    assert sorted(p.name for p in (root / "object").glob("mask_*.png")) == [
        f"mask_{i:04d}.png" for i in range(1, len(frames) + 1)
    ]
    assert len(list((root / "object/id_4").glob("*.png"))) == len(frames)
    assert len(list((root / "all").glob("*.png"))) == len(frames)
    assert result["matte"]["matte_count"] == len(frames)


def test_project_in_a_bucket_is_reused_by_a_later_job(
    vfx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: Any, clip: OrbitClip
) -> None:
    from core.config import Settings, get_settings
    from core.storage import BucketTarget

    monkeypatch.delenv("OUTPUT_DIR")
    for key, value in {
        "BUCKET_ENDPOINT_URL": s3_server.endpoint_url,
        "BUCKET_NAME": s3_server.bucket,
        "BUCKET_ACCESS_KEY_ID": s3_server.access_key,
        "BUCKET_SECRET_ACCESS_KEY": s3_server.secret_key,
        "BUCKET_KEY_PREFIX": "vfx-job-tests",
        "WORK_DIR": str(tmp_path / "work"),
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    frames = clip.frames[:6]
    video = video_b64(frames, tmp_path / "h.mp4", clip.fps)
    first = vfx({"project_name": "Bucket_Shot", "stages": ["ingest"], "video": video})
    assert first["status"] == "completed" and first["project"]["storage"] == "s3", first
    assert first["project"]["prefix"] == "vfx-job-tests/projects/Bucket_Shot/"
    # Roto masks kept in the bucket, as a roto run leaves them.
    bucket = BucketTarget.from_settings(get_settings())
    project = Project("Bucket_Shot", Settings(work_dir=tmp_path / "work"), bucket)
    per_frame = [[RotoInstance("person", 1, mask)] for mask in clip.masks[:6]]
    write_roto(per_frame, ["person"], project.root / "roto", list(range(1, 7)), clip.masks[0].shape)
    project.publish("roto")
    project.close()

    second = vfx({"project_name": "Bucket_Shot", "stages": ["matte"]})
    assert second["status"] == "completed", second
    assert second["matte"]["matte_count"] == 6
    keys = [
        item["Key"]
        for item in s3_server.client().list_objects_v2(
            Bucket=s3_server.bucket, Prefix="vfx-job-tests/projects/Bucket_Shot/matte/"
        )["Contents"]
    ]
    assert len(keys) == 6 and keys[0].endswith("matte_0001.png")
    assert not list((tmp_path / "work").iterdir())  # the working copies are gone
