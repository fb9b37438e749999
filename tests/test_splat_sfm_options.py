"""SfM choices (features, mapper) and the scene's frame (orient) on the synthetic orbit.

The scene (tests/splat_scene.py) stands on the ground plane z = 0 with known cameras, so
after a similarity alignment of SfM's camera centres to the truth the ground's normal is
known in SfM's frame: orienting must put it on the declared up axis. Bounds on the poses are
those tests/test_splat_sfm.py holds the incremental path to (centre RMS under 1.5 % of the
orbit radius, rotation RMS under 1.5 degrees).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.splat import sfm as sfm_module
from core.splat.export import frame_comments, read_ply, to_transforms_json, write_rgb_ply
from core.splat.schema import SplatRequest
from core.splat.sfm import FEATURE_LEVELS, SfmResult, orientation, run_sfm
from tests.splat_scene import look_at, make_scene, orbit_poses, pose_errors, render_views, umeyama

N_VIEWS = 32
THREADS = 2


@pytest.fixture(scope="module")
def orbit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any], float]:
    images, _k, poses, scene = render_views(N_VIEWS, seed=0)
    folder = tmp_path_factory.mktemp("orbit") / "images"
    folder.mkdir()
    for i, view in enumerate(images):
        cv2.imwrite(str(folder / f"frame_{i:05d}.png"), view)
    return folder, poses, scene.radius


def _truth_centres(result: SfmResult, poses: list[Any]) -> np.ndarray:
    views = [int(Path(n).stem.split("_")[1]) for n in result.registered_names]
    return np.array([-poses[v][0].T @ poses[v][1] for v in views])


def _errors(result: SfmResult, poses: list[Any]) -> dict[str, float]:
    views = [int(Path(n).stem.split("_")[1]) for n in result.registered_names]
    return pose_errors(
        [im.rotation for im in result.images],
        np.array([im.center for im in result.images]),
        [poses[v][0] for v in views],
        _truth_centres(result, poses),
    )


def _ground_normal(result: SfmResult, poses: list[Any]) -> np.ndarray:
    """The truth's +Z (the ground's normal) in the result's frame: truth = s R est + t maps a
    truth direction d to the estimate's R^T d."""
    centres = np.array([im.center for im in result.images])
    _scale, rot, _t = umeyama(centres, _truth_centres(result, poses))
    return rot.T @ np.array([0.0, 0.0, 1.0])


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _sfm(orbit: tuple[Path, list[Any], float], work: Path, **kwargs: Any) -> SfmResult:
    return run_sfm(orbit[0], work, num_threads=THREADS, matching="sequential", **kwargs)


def test_global_mapper_low_features_recovers_the_cameras_up_on_y(orbit, tmp_path: Path) -> None:
    _folder, poses, radius = orbit
    result = _sfm(
        orbit, tmp_path / "work", mapper="global", max_features=FEATURE_LEVELS["low"], orient="y_up"
    )
    errors = _errors(result, poses)
    print("\nglobal, low:", json.dumps({**result.stats(), **errors}), flush=True)
    report = result.mapper
    assert report["requested"] == "global"
    if report["fallback"]:  # allowed, but then it must say why, and incremental must hold
        assert report["used"] == "incremental" and "global mapping" in report["reason"]
    else:
        assert report["used"] == "global" and report["global_registered"] == N_VIEWS
    assert result.registered_fraction >= 0.9
    assert errors["centre_rms"] < 0.015 * radius
    assert errors["rotation_rms_deg"] < 1.5
    # y_up: the ground's normal is +Y, the camera centres are centred.
    assert _angle_deg(_ground_normal(result, poses), np.array([0.0, 1.0, 0.0])) < 3.0
    centres = np.array([im.center for im in result.images])
    assert np.linalg.norm(centres.mean(axis=0)) < 1e-6 * np.linalg.norm(centres, axis=1).max()
    np.testing.assert_allclose(result.up, [0.0, 1.0, 0.0], atol=1e-6)
    assert result.stats()["orient"] == "y_up"


def test_fallback_to_incremental_and_z_up_applied_consistently(
    orbit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _folder, poses, radius = orbit
    plain = _sfm(orbit, tmp_path / "plain", mapper="incremental", orient="none")
    np.testing.assert_allclose(plain.applied_transform, np.eye(4)[:3])
    assert plain.mapper == {"requested": "incremental", "used": "incremental", "fallback": False}

    # A global mapper that registers nothing: the result falls back and says so.
    monkeypatch.setattr(sfm_module, "_map_global", lambda run, sparse: sparse.mkdir() or {})
    result = _sfm(orbit, tmp_path / "oriented", mapper="global", orient="z_up")
    assert result.mapper == {
        "requested": "global",
        "used": "incremental",
        "fallback": True,
        "reason": f"global mapping registered 0/{N_VIEWS} frames (< 90%)",
        "global_registered": 0,
    }
    assert result.stats()["mapper"]["fallback"] is True
    errors = _errors(result, poses)
    assert errors["centre_rms"] < 0.015 * radius and errors["rotation_rms_deg"] < 1.5

    # Ground normal on +Z within a few degrees; camera centres centred.
    assert _angle_deg(_ground_normal(result, poses), np.array([0.0, 0.0, 1.0])) < 3.0
    centres = np.array([im.center for im in result.images])
    np.testing.assert_allclose(centres.mean(axis=0), 0.0, atol=1e-6 * radius)

    a = result.applied_transform
    assert a.shape == (3, 4)
    np.testing.assert_allclose(a[:, :3] @ a[:, :3].T, np.eye(3), atol=1e-9)
    assert np.linalg.det(a[:, :3]) > 0

    # The transform as applied to COLMAP's model (the plain run's, re-read from disk): it
    # moves cameras and points alike, x' = A [x; 1], and rotations R' = R A^T.
    import pycolmap

    assert plain.model_dir is not None
    # Points compare in the order the file gives them: read it twice, transform one.
    before = sfm_module.result_from_reconstruction(
        pycolmap.Reconstruction(plain.model_dir), plain.total_images
    )
    model = pycolmap.Reconstruction(plain.model_dir)
    applied = sfm_module._orient_model(pycolmap, model, plain, "z_up")
    moved = sfm_module.result_from_reconstruction(model, plain.total_images)
    old_centres = np.array([im.center for im in plain.images])
    np.testing.assert_allclose(
        np.array([im.center for im in moved.images]),
        (applied[:, :3] @ old_centres.T).T + applied[:, 3],
        atol=1e-9 * radius,
    )
    for old, new in zip(plain.images, moved.images, strict=True):
        np.testing.assert_allclose(new.rotation, old.rotation @ applied[:, :3].T, atol=1e-9)
    np.testing.assert_allclose(
        moved.points_xyz,
        (applied[:, :3] @ before.points_xyz.T).T + applied[:, 3],
        atol=1e-4 * radius,  # float32 points
    )
    assert _angle_deg(_ground_normal(moved, poses), np.array([0.0, 0.0, 1.0])) < 3.0

    # The model on disk is the oriented one (undistortion and training read it).
    assert result.model_dir is not None
    on_disk = pycolmap.Reconstruction(result.model_dir)
    first = on_disk.image(result.images[0].image_id).cam_from_world()
    np.testing.assert_allclose(first.rotation.matrix(), result.images[0].rotation, atol=1e-9)

    # transforms.json and the PLYs say which axis is up and what was applied.
    transforms = json.loads(json.dumps(to_transforms_json(result)))
    np.testing.assert_allclose(transforms["applied_transform"], a)
    assert transforms["up"] == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)
    assert transforms["orient"] == "z_up"
    np.testing.assert_allclose(result.stats()["applied_transform"], a, atol=1e-8)
    write_rgb_ply(
        tmp_path / "points.ply",
        result.points_xyz,
        result.points_rgb,
        comments=frame_comments(result),
    )
    comments = list(read_ply(tmp_path / "points.ply")["comments"])
    assert comments[0] == "orient z_up" and comments[1] == "up 0 0 1"
    numbers = [float(v) for v in comments[2].split()[1:]]
    np.testing.assert_allclose(np.reshape(numbers, (3, 4)), a, atol=1e-7)


def _rigid(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q)), rng.normal(size=3) * 10


def _fake_result(poses: list[tuple[np.ndarray, np.ndarray]]) -> SfmResult:
    from core.splat.sfm import CameraIntrinsics, SfmImage

    cam = CameraIntrinsics("PINHOLE", 320, 240, 280, 280, 160, 120, (280, 280, 160, 120))
    images = [SfmImage(f"f{i}.png", i, 1, r, t, -r.T @ t, cam) for i, (r, t) in enumerate(poses)]
    empty = np.zeros((0, 3), np.float32)
    return SfmResult(images, len(images), empty, empty.astype(np.uint8), empty[:, 0],
                     np.zeros(0, np.int32), 0.0)  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_up_from_an_orbit_and_from_a_walk(seed: int) -> None:
    """The estimate alone, on exact poses moved by a random rigid transform: an orbit's
    up is its plane's normal; a straight walk (not planar) falls back to the mean camera up."""
    scene = make_scene(0)
    rot, trans = _rigid(seed)

    def moved(poses: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        # World moved by x' = rot x + trans: R' = R rot^T, t' = t - R' trans.
        return [(r @ rot.T, t - (r @ rot.T) @ trans) for r, t in poses]

    orbit = _fake_result(moved(orbit_poses(scene, 24, arc_deg=360)))
    walk_poses = []
    for i in range(12):  # along x, looking ahead, about 5 degrees down, a little sway
        centre = np.array([i * 0.3, 0.1 * np.sin(i), 1.6 + 0.02 * np.cos(2 * i)])
        walk_poses.append(look_at(centre, centre + np.array([1.0, 0.2 * np.cos(i), -0.08])))
    walk = _fake_result(moved(walk_poses))
    for result, bound in ((orbit, 0.5), (walk, 6.0)):
        matrix, up = orientation(result, "z_up")
        assert _angle_deg(up, rot @ np.array([0.0, 0.0, 1.0])) < bound
        centres = np.array([im.center for im in result.images])
        new = (matrix[:, :3] @ centres.T).T + matrix[:, 3]
        np.testing.assert_allclose(new.mean(axis=0), 0.0, atol=1e-9)
        np.testing.assert_allclose(matrix[:, :3] @ up, [0.0, 0.0, 1.0], atol=1e-9)
    none, _up = orientation(orbit, "none")
    np.testing.assert_allclose(none, np.eye(4)[:3])
    with pytest.raises(ValueError, match="orient"):
        orientation(orbit, "x_up")  # type: ignore[arg-type]


def test_request_fields() -> None:
    request = SplatRequest.model_validate({"video": "x"})
    assert (request.features, request.mapper, request.orient) == ("medium", "auto", "z_up")
    assert FEATURE_LEVELS == {"low": 2048, "medium": 8192, "high": 16384}
    request = SplatRequest.model_validate(
        {"video": "x", "features": "high", "mapper": "global", "orient": "none"}
    )
    assert (request.features, request.mapper, request.orient) == ("high", "global", "none")
    for field, bad in (("features", "ultra"), ("mapper", "glomap"), ("orient", "up")):
        with pytest.raises(ValueError, match=field):
            SplatRequest.model_validate({"video": "x", field: bad})
    assert sfm_module._mapper_choice("auto", 199) == "incremental"
    assert sfm_module._mapper_choice("auto", 200) == "global"


def test_the_pipeline_passes_the_fields_to_run_sfm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from core.errors import SfmFailed
    from core.splat import pipeline
    from tests.splat_scene import encode_mp4

    seen: dict[str, Any] = {}

    def fake_run_sfm(image_dir: Path, work_dir: Path, **kwargs: Any) -> SfmResult:
        seen.update(kwargs)
        raise SfmFailed("stop here")

    monkeypatch.setattr(pipeline, "run_sfm", fake_run_sfm)
    monkeypatch.setenv("WORK_DIR", str(tmp_path))
    from core.config import get_settings

    get_settings.cache_clear()
    frames = [np.full((64, 64, 3), 40 * i, np.uint8) for i in range(4)]
    video = base64.b64encode(encode_mp4(frames, tmp_path / "v.mp4", fps=4).read_bytes()).decode()
    job = {"video": video, "task": "sfm", "fps": 4, "features": "low", "mapper": "global"}
    result = pipeline.run_splat_job({"id": "t", "input": {**job, "orient": "y_up"}})
    assert result["error_code"] == "sfm_failed", result
    assert (seen["max_features"], seen["mapper"], seen["orient"]) == (2048, "global", "y_up")
    result = pipeline.run_splat_job({"id": "t", "input": {"video": video, "fps": 4}})
    assert (seen["max_features"], seen["mapper"], seen["orient"]) == (8192, "auto", "z_up")
    get_settings.cache_clear()
