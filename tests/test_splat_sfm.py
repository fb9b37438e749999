"""Frames and Structure-from-Motion on a rendered scene with known cameras (real pycolmap).

The scene (tests/splat_scene.py) is ray-cast exactly with a known pinhole K and known
world-to-camera poses, so SfM's answer is checked against the truth: after a similarity
alignment (SfM has no scale or gauge), camera centres and rotations must match.

Measured on this repository's 2-core CPU machine with 32 views (orbit radius 5 units,
320x240, f = 280 px), seeds 0-2: single shared camera, sequential matching: centre RMS
0.020-0.026 (0.4-0.5 % of the radius), rotation RMS 0.26-0.37 deg, reprojection 0.26-0.28
px, f within 1 %; one camera per image, exhaustive matching on 24 views: centre RMS 0.03-0.08
(0.6-1.6 %; each image's focal length is free, so depth and focal trade off). The
thresholds below sit 2.5-3x above the worst of those and far below what wrong poses give
(the shuffled-centres control shows it).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.errors import InvalidInput, MediaDecodeFailed, PayloadTooLarge, SfmFailed
from core.progress import ProgressReporter
from core.splat.export import (
    CV_TO_GL,
    camera_to_world_from_transforms,
    to_cameras_json,
    to_transforms_json,
)
from core.splat.frames import (
    load_photos,
    photos_from_zip,
    select_sharp_frames,
    sharpness,
    write_frames,
)
from core.splat.sfm import SfmResult, run_sfm, undistort_to_pinhole
from tests.splat_scene import encode_mp4, pan_views, pose_errors, random_texture, render_views

N_VIEWS = 32
FOCAL = 280.0
THREADS = 2
MAX_FEATURES = 4096  # 320x240 frames give ~700 SIFT features each; the cap only bounds time


@pytest.fixture(scope="module")
def scene_views() -> tuple[
    list[np.ndarray], np.ndarray, list[tuple[np.ndarray, np.ndarray]], float
]:
    images, k, poses, scene = render_views(N_VIEWS, focal=FOCAL, seed=0)
    return images, k, poses, scene.radius


def _truth(poses: list[tuple[np.ndarray, np.ndarray]], names: list[str], order: list[int]):
    """True rotations and centres for SfM images named frame_<i> -> view order[i]."""
    views = [order[int(Path(n).stem.split("_")[1])] for n in names]
    rots = [poses[v][0] for v in views]
    centres = np.array([-poses[v][0].T @ poses[v][1] for v in views])
    return rots, centres


def _errors(result: SfmResult, poses, order: list[int]) -> dict[str, float]:
    true_rot, true_centres = _truth(poses, result.registered_names, order)
    return pose_errors(
        [im.rotation for im in result.images],
        np.array([im.center for im in result.images]),
        true_rot,
        true_centres,
    )


def _glog_files_of_this_process() -> list[str]:
    # glog names its files <program>.<host>.<user>.log.<LEVEL>.<date>.<pid> in the temp dir.
    pid = f".{os.getpid()}"
    return [n for n in os.listdir(tempfile.gettempdir()) if ".log." in n and n.endswith(pid)]


# --------------------------------------------------------------------------------------------
# The full front half: mp4 -> sharpest frames -> files -> SfM -> camera files


def test_video_to_sfm_recovers_known_cameras(scene_views, tmp_path: Path) -> None:
    images, _k, poses, radius = scene_views
    # Each view twice at 16 fps, once sharp and once blurred, in random order; selecting at
    # 8 fps must keep the sharp one of each pair.
    rng = np.random.default_rng(7)
    frames, sharp_index = [], []
    for view in images:
        blurred = cv2.GaussianBlur(view, (0, 0), 2.0)
        first_sharp = bool(rng.random() < 0.5)
        frames += [view, blurred] if first_sharp else [blurred, view]
        sharp_index.append(len(frames) - (2 if first_sharp else 1))
    video = encode_mp4(frames, tmp_path / "orbit.mp4", fps=16)

    selected = select_sharp_frames(video, fps=8, max_side=1600)
    assert [f.index for f in selected] == sharp_index
    names = write_frames(selected, tmp_path / "images")
    assert names[0] == "frame_00000.jpg" and len(names) == N_VIEWS

    updates: list[dict[str, Any]] = []
    reporter = ProgressReporter(
        {"id": "t"}, sink=lambda job, u: updates.append(u), min_interval_s=0
    )
    work = tmp_path / "work"
    result = run_sfm(
        tmp_path / "images",
        work,
        matching="sequential",
        progress=reporter,
        max_features=MAX_FEATURES,
        num_threads=THREADS,
    )
    errors = _errors(result, poses, list(range(N_VIEWS)))
    print("\nvideo SfM:", json.dumps({**result.stats(), **result.timings_ms, **errors}), flush=True)

    assert result.registered_fraction >= 0.9
    assert result.total_images == N_VIEWS
    assert result.num_points > 500
    assert result.mean_reprojection_error < 1.5
    assert errors["centre_rms"] < 0.015 * radius
    assert errors["rotation_rms_deg"] < 1.5
    # Shuffled centres as a control: the same alignment then fails by far. (Not reversed:
    # a reversed orbit is the same circle, which a rotation maps onto the truth.)
    shuffled = pose_errors(
        [np.eye(3)] * result.num_registered,
        rng.permutation(np.array([im.center for im in result.images])),
        [np.eye(3)] * result.num_registered,
        _truth(poses, result.registered_names, list(range(N_VIEWS)))[1],
    )
    assert shuffled["centre_rms"] > 10 * 0.015 * radius

    # One shared SIMPLE_RADIAL camera for video, close to the truth.
    cams = {im.camera_id for im in result.images}
    assert len(cams) == 1
    cam = result.images[0].intrinsics
    assert cam.model == "SIMPLE_RADIAL" and (cam.width, cam.height) == (320, 240)
    assert abs(cam.fx - FOCAL) / FOCAL < 0.02
    assert (cam.cx, cam.cy) == (160.0, 120.0)
    # Poses are consistent: centre = -R^T t, and camera_to_world inverts world_to_camera.
    for im in result.images:
        np.testing.assert_allclose(im.center, -im.rotation.T @ im.translation, atol=1e-9)
        np.testing.assert_allclose(im.camera_to_world @ im.world_to_camera, np.eye(4), atol=1e-9)
    # Points: a well-formed cloud whose errors are pixel-sized.
    assert result.points_xyz.dtype == np.float32 and result.points_xyz.shape[1] == 3
    assert (
        result.points_rgb.dtype == np.uint8 and result.points_rgb.shape == result.points_xyz.shape
    )
    assert result.points_error.shape == (result.num_points,)
    assert float(np.median(result.points_error)) < 1.5
    assert (result.points_track_length >= 2).all()

    # Progress: one stage, monotonic, per registered image, ends at 100 with the counts.
    assert {u["stage"] for u in updates} == {"running_colmap"}
    values = [u["progress"] for u in updates]
    assert values == sorted(values) and values[-1] == 100.0
    assert sum("registered" in u["message"] for u in updates) >= N_VIEWS - 2
    assert {u["sfm_step"] for u in updates} >= {"features", "matching", "mapping", "done"}
    assert set(result.timings_ms) >= {"extract", "match", "map", "total"}

    # Only database.db and sparse/<i> were written, all inside work_dir, and no glog file.
    assert sorted(p.name for p in work.iterdir()) == ["database.db", "sparse"]
    assert result.model_dir is not None and result.model_dir.parent == work / "sparse"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "orbit.mp4", "work"]
    assert sorted(os.listdir(tmp_path / "images")) == names
    assert _glog_files_of_this_process() == []

    _check_camera_files(result)
    _check_undistort(result, tmp_path / "images", tmp_path / "work" / "undistorted")


def _check_camera_files(result: SfmResult) -> None:
    transforms = json.loads(json.dumps(to_transforms_json(result)))
    cam = result.images[0].intrinsics
    assert transforms["camera_model"] == "OPENCV"
    assert (transforms["w"], transforms["h"]) == (cam.width, cam.height)
    assert transforms["fl_x"] == cam.fx and transforms["cx"] == cam.cx
    assert transforms["k1"] == cam.params[3]
    assert len(transforms["frames"]) == result.num_registered
    cameras = json.loads(json.dumps(to_cameras_json(result)))
    assert len(cameras) == result.num_registered

    point = np.append(result.points_xyz[0].astype(np.float64), 1.0)
    for image, frame, entry in zip(result.images, transforms["frames"], cameras, strict=True):
        assert frame["file_path"] == f"images/{image.name}"
        gl = np.array(frame["transform_matrix"])
        # Round trip: OpenGL camera-to-world -> OpenCV camera-to-world -> world-to-camera.
        np.testing.assert_allclose(camera_to_world_from_transforms(gl), image.camera_to_world)
        np.testing.assert_allclose(np.linalg.inv(gl @ CV_TO_GL), image.world_to_camera, atol=1e-9)
        # In the OpenGL camera a point in front has negative z and the same x, flipped y.
        cv_cam = image.world_to_camera @ point
        gl_cam = np.linalg.inv(gl) @ point
        np.testing.assert_allclose(gl_cam[:3], cv_cam[:3] * [1, -1, -1], atol=1e-9)
        # cameras.json: position is the centre, rotation is camera-to-world (R^T).
        assert entry["img_name"] == Path(image.name).stem
        np.testing.assert_allclose(entry["position"], image.center)
        np.testing.assert_allclose(np.array(entry["rotation"]).T, image.rotation)
        assert (entry["fx"], entry["fy"]) == (image.intrinsics.fx, image.intrinsics.fy)
        assert (entry["width"], entry["height"]) == (cam.width, cam.height)


def _check_undistort(result: SfmResult, image_dir: Path, out_dir: Path) -> None:
    pinhole = undistort_to_pinhole(result, image_dir, out_dir, num_threads=THREADS)
    assert pinhole.registered_names == result.registered_names
    assert {im.intrinsics.model for im in pinhole.images} == {"PINHOLE"}
    assert pinhole.num_points == result.num_points
    for a, b in zip(result.images, pinhole.images, strict=True):
        np.testing.assert_allclose(a.rotation, b.rotation, atol=1e-9)
        np.testing.assert_allclose(a.translation, b.translation, atol=1e-9)
        w, h = b.intrinsics.width, b.intrinsics.height
        assert cv2.imread(str(out_dir / "images" / b.name)).shape[:2] == (h, w)
    transforms = to_transforms_json(pinhole)
    assert transforms["k1"] == 0.0


def test_photo_zip_exhaustive_per_image_cameras(scene_views, tmp_path: Path) -> None:
    """Photos in a zip (shuffled names), exhaustive matching, one camera per image."""
    images, _k, poses, radius = scene_views
    views = list(range(0, 24))  # a 270-degree arc of the orbit
    rng = np.random.default_rng(3)
    order = [views[i] for i in rng.permutation(len(views))]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, view in enumerate(order):
            ok, jpg = cv2.imencode(".jpg", images[view], [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            archive.writestr(f"shots/IMG_{i}.jpg", jpg.tobytes())
    photos = photos_from_zip(buffer.getvalue(), max_side=1600)
    assert len(photos) == len(views)
    write_frames(photos, tmp_path / "images")
    result = run_sfm(
        tmp_path / "images",
        tmp_path / "work",
        matching="auto",  # 24 images: exhaustive
        single_camera=False,
        max_features=MAX_FEATURES,
        num_threads=THREADS,
    )
    errors = _errors(result, poses, order)
    print("\nphoto SfM:", json.dumps({**result.stats(), **result.timings_ms, **errors}), flush=True)
    assert result.registered_fraction >= 0.9
    assert result.mean_reprojection_error < 1.5
    assert errors["centre_rms"] < 0.04 * radius
    assert errors["rotation_rms_deg"] < 2.5
    assert len({im.camera_id for im in result.images}) == result.num_registered
    transforms = to_transforms_json(result)
    assert "fl_x" not in transforms and "fl_x" in transforms["frames"][0]


# --------------------------------------------------------------------------------------------
# Sharpest-frame selection


def _pan_frames(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """A slow pan over a random texture: consecutive frames look alike, as in real video."""
    texture = random_texture(rng, 200, 200 + 4 * n)
    return [np.ascontiguousarray(texture[:, 4 * i : 4 * i + 192]) for i in range(n)]


def test_sharpest_frame_of_each_window_is_chosen(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    per_window, windows, fps = 4, 6, 12
    frames = _pan_frames(rng, per_window * windows)
    sharp_index = []
    for w in range(windows):
        keep = int(rng.integers(per_window))
        sharp_index.append(w * per_window + keep)
        for j in range(per_window):
            if j != keep:
                sigma = float(rng.uniform(1.2, 3.0))
                i = w * per_window + j
                frames[i] = cv2.GaussianBlur(frames[i], (0, 0), sigma)
    video = encode_mp4(frames, tmp_path / "blur.mp4", fps=fps)

    chosen = select_sharp_frames(video, fps=fps / per_window)
    assert [f.index for f in chosen] == sharp_index
    assert [round(f.time_s * fps) for f in chosen] == sharp_index
    # Each chosen frame is the sharpest of its window (scored on the decoded video).
    assert all(sharpness(f.pixels) > 0 for f in chosen)

    # Trimming, resizing and max_frames.
    trimmed = select_sharp_frames(
        video, fps=fps / per_window, start_sec=per_window / fps, max_frames=3, max_side=96
    )
    assert [f.index for f in trimmed] == sharp_index[1:4]
    assert max(trimmed[0].pixels.shape[:2]) == 96
    with pytest.raises(InvalidInput, match="fps"):
        select_sharp_frames(video, fps=0)
    with pytest.raises(InvalidInput, match="past the end"):
        select_sharp_frames(video, fps=2, start_sec=60)


# --------------------------------------------------------------------------------------------
# Failure paths


def _assert_clean(work: Path) -> None:
    assert not work.exists() or list(work.iterdir()) == []


def test_blank_wall_fails_with_a_hint(tmp_path: Path) -> None:
    # A uniform wall with a faint smooth gradient, the camera drifting: nothing for SIFT.
    ramp = np.linspace(150, 156, 320, dtype=np.float32)
    frames = [
        np.repeat(np.clip(ramp + i * 0.05, 0, 255)[None, :, None], 240, 0)
        .repeat(3, 2)
        .astype(np.uint8)
        for i in range(24)
    ]
    video = encode_mp4(frames, tmp_path / "wall.mp4", fps=8)
    write_frames(select_sharp_frames(video, fps=8), tmp_path / "images")
    work = tmp_path / "work"
    with pytest.raises(SfmFailed) as info:
        run_sfm(tmp_path / "images", work, num_threads=THREADS, max_features=MAX_FEATURES)
    message = info.value.message
    assert "texture" in message and "move around the subject" in message
    assert info.value.details["total"] == 24 and info.value.details["registered"] == 0
    assert info.value.code == "sfm_failed"
    _assert_clean(work)


def test_two_frame_video_fails_with_a_hint(scene_views, tmp_path: Path) -> None:
    images = scene_views[0]
    video = encode_mp4(images[:2], tmp_path / "two.mp4", fps=2)
    frames = select_sharp_frames(video, fps=2)
    assert len(frames) == 2
    write_frames(frames, tmp_path / "images")
    work = tmp_path / "work"
    with pytest.raises(SfmFailed, match=r"only 2 frame.*longer clip or a higher fps"):
        run_sfm(tmp_path / "images", work, num_threads=THREADS)
    _assert_clean(work)


def test_few_registered_frames_fail_with_counts(scene_views, tmp_path: Path) -> None:
    """Two unrelated scenes, 5 and 3 frames: at most 5 of 8 can join the largest model."""
    images = scene_views[0][:5]  # 11.25 degrees apart: this part reconstructs
    others = render_views(3, focal=FOCAL, seed=5, arc_deg=20)[0]
    write_frames(images + others, tmp_path / "images")
    work = tmp_path / "work"
    with pytest.raises(SfmFailed) as info:
        run_sfm(
            tmp_path / "images",
            work,
            min_registered_fraction=0.75,
            num_threads=THREADS,
            max_features=MAX_FEATURES,
        )
    message = info.value.message
    assert message.startswith("only ") and " of 8 frames registered" in message, message
    assert 3 <= info.value.details["registered"] <= 5
    assert "move around the subject" in message and "higher fps" in message
    _assert_clean(work)


def test_camera_turning_in_place_fails_with_a_parallax_hint(tmp_path: Path) -> None:
    # Every pair matches, but by a rotation alone: COLMAP finds no pair to triangulate
    # from (or only fragments), and the hint says why instead of a generic failure.
    write_frames(pan_views(12), tmp_path / "images")
    work = tmp_path / "work"
    with pytest.raises(SfmFailed) as info:
        run_sfm(tmp_path / "images", work, num_threads=THREADS, max_features=MAX_FEATURES)
    assert "turn in place" in info.value.message
    assert info.value.details["rotation_only_pair_fraction"] >= 0.8
    assert info.value.details["verified_pairs"] > 12
    _assert_clean(work)


def test_corrupt_video_is_a_decode_failure(scene_views, tmp_path: Path) -> None:
    with pytest.raises(MediaDecodeFailed):
        select_sharp_frames(os.urandom(50_000), fps=5)
    video = encode_mp4(scene_views[0][:8], tmp_path / "ok.mp4", fps=8).read_bytes()
    with pytest.raises(MediaDecodeFailed):
        select_sharp_frames(video[: len(video) // 3], fps=5)  # the moov atom is at the end


def test_run_sfm_without_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(SfmFailed, match="only 0 frame"):
        run_sfm(tmp_path / "images", tmp_path / "work")


# --------------------------------------------------------------------------------------------
# Photos and zips


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def _jpg(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    ok, data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


def test_load_photos_resizes_and_rejects_garbage() -> None:
    photos = load_photos([_jpg((0, 0, 255), (400, 200)), _png((0, 255, 0))], max_side=100)
    assert [p.shape for p in photos] == [(50, 100, 3), (30, 40, 3)]
    with pytest.raises(MediaDecodeFailed, match=r"images\[1\]"):
        load_photos([_png((1, 2, 3)), b"not an image at all"], max_side=100)


def test_zip_decodes_only_images_in_natural_order() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("img_10.png", _png((0, 0, 10)))
        archive.writestr("img_2.png", _png((0, 0, 2)))
        archive.writestr("notes.txt", "camera: phone\n")
        archive.writestr("renamed.jpg", b"plain text pretending to be a jpeg")
        archive.writestr(zipfile.ZipInfo("sub/"), b"")  # a directory entry
        archive.writestr("sub/img_3.jpg", _jpg((0, 0, 200), (300, 100)))
        archive.writestr("__MACOSX/sub/._img_3.jpg", b"\x00\x05\x16\x07resource fork")
        archive.writestr(".DS_Store", b"\x00\x00\x00\x01Bud1")
    photos = photos_from_zip(buffer.getvalue(), max_side=150)
    assert [p.shape for p in photos] == [(30, 40, 3), (30, 40, 3), (50, 150, 3)]
    assert [int(p[0, 0, 2]) for p in photos[:2]] == [2, 10]  # img_2 before img_10

    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("readme.md", "# nothing here")
    with pytest.raises(InvalidInput, match="no images"):
        photos_from_zip(empty.getvalue(), max_side=100)
    with pytest.raises(MediaDecodeFailed, match="zip"):
        photos_from_zip(b"PK\x03\x04 but not really a zip", max_side=100)

    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(4):
            archive.writestr(f"{i}.png", _png((i, i, i)))
    with pytest.raises(PayloadTooLarge, match="more than 3 images"):
        photos_from_zip(many.getvalue(), max_side=100, max_files=3)


def test_zip_bombs_are_refused() -> None:
    # Real inflation: 64 MB of zeros deflate to ~60 KB; refused by the total cap before
    # anything is inflated.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", _png((1, 1, 1)))
        archive.writestr("zeros.png", b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024 * 1024))
    assert len(bomb.getvalue()) < 1024 * 1024
    with pytest.raises(PayloadTooLarge, match="zip bomb"):
        photos_from_zip(bomb.getvalue(), max_side=100, max_total_bytes=16 * 1024 * 1024)
    with pytest.raises(PayloadTooLarge, match="limit per file"):
        photos_from_zip(bomb.getvalue(), max_side=100, max_file_bytes=16 * 1024 * 1024)

    # A forged header: a tiny entry whose central directory claims ~4 GB uncompressed.
    small = io.BytesIO()
    with zipfile.ZipFile(small, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", _png((1, 1, 1)))
    data = bytearray(small.getvalue())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 0xFFFF_FFF0)  # uncompressed size field
    with pytest.raises(PayloadTooLarge, match="zip bomb"):
        photos_from_zip(bytes(data), max_side=100)
