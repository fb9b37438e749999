"""The VFX stages on their own, on data with known truth: ingest's numbering, the project store
(OUTPUT_DIR and a bucket), the camera export on known cameras (camera_data.json, Nuke .chan,
Blender script), the roto mask files, the matte's soft edge, and the clean plate against the
true background."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.config import Settings
from core.errors import InvalidInput, ModelUnavailable
from core.media import iter_video_frames
from core.stages.camera_export import (
    Intrinsics,
    blender_script,
    camera_data,
    colmap_world_to_camera,
    euler_zxy,
    nuke_chan,
    read_blender_frames,
    read_chan,
    rotation_zxy,
    scene_camera_to_world,
)
from core.stages.cleanplate import clean_plates, grow
from core.stages.ingest import ingest_frames, load_frames, read_manifest
from core.stages.matte import guided_alpha, load_matte, matte_frames, trimap
from core.stages.project import Project, path_error
from core.stages.roto import RotoInstance, read_combined, write_roto
from core.storage import BucketTarget
from tests.orbit_scene import OrbitClip, orbit_clip
from tests.splat_scene import encode_mp4, pan_views, random_texture


@pytest.fixture(scope="module")
def clip() -> OrbitClip:
    return orbit_clip(12, width=192, height=144, follow=False)


def numbered_frames(count: int, width: int = 160, height: int = 120) -> list[np.ndarray]:
    """Frames whose grey level says their number (survives H.264 at crf 10)."""
    return [np.full((height, width, 3), 30 + 20 * i, np.uint8) for i in range(count)]


def read_image(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    pixels = cv2.imread(str(path), flags)
    assert pixels is not None, path
    return pixels


def local_project(tmp_path: Path, name: str = "Shot_010") -> Project:
    return Project(name, Settings(output_dir=tmp_path / "out"), None)


# --------------------------------------------------------------------------------------------
# ingest and the project


def test_ingest_ten_frames_numbers_files_and_source_frames(tmp_path: Path) -> None:
    frames = numbered_frames(10)
    video = encode_mp4(frames, tmp_path / "plate.mp4", fps=24.0)
    project = local_project(tmp_path)
    ingested = ingest_frames(iter_video_frames(video, fps=24.0), project, fps=None, source_fps=24.0)
    assert ingested.frame_count == 10
    files = [p.name for p in project.frame_files()]
    assert files == [f"frame_{i:04d}.png" for i in range(1, 11)]
    manifest = read_manifest(project)
    assert [f.source_frame for f in manifest.frames] == list(range(10))
    assert [f.number for f in manifest.frames] == list(range(1, 11))
    assert np.allclose([f.time_s for f in manifest.frames], np.arange(10) / 24.0, atol=1e-3)
    loaded = load_frames(project, manifest)
    levels = [int(np.median(f)) for f in loaded]
    assert all(abs(level - (30 + 20 * i)) <= 6 for i, level in enumerate(levels)), levels

    # Half the rate: every other source frame, numbered from 1 again (the old files replaced).
    again = ingest_frames(iter_video_frames(video, fps=12.0), project, fps=12.0, source_fps=24.0)
    assert [f.source_frame for f in again.frames] == [0, 2, 4, 6, 8]
    assert len(project.frame_files()) == 5
    assert json.loads((project.root / "source/manifest.json").read_text())["fps"] == 12.0


def test_project_names_and_paths_are_safe(tmp_path: Path) -> None:
    for bad in ("../up", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(InvalidInput, match="project_name"):
            local_project(tmp_path, bad)
    for bad in ("../x", "/etc/passwd", "a/../../b", "a\\b", ".git/config"):
        assert path_error(bad) is not None
    assert path_error("roto/person/id_1/mask_0001.png") is None
    with pytest.raises(InvalidInput, match="OUTPUT_DIR"):
        Project("Shot", Settings(output_dir=None), None)


def test_project_in_a_bucket_round_trips(tmp_path: Path, s3_server: Any) -> None:
    bucket = BucketTarget(
        s3_server.bucket, s3_server.access_key, s3_server.secret_key, s3_server.endpoint_url,
        key_prefix="vfx-tests",
    )  # fmt: skip
    settings = Settings(work_dir=tmp_path / "work")
    first = Project("BucketShot", settings, bucket)
    video = encode_mp4(numbered_frames(4), tmp_path / "plate.mp4", fps=24.0)
    ingest_frames(iter_video_frames(video), first, fps=None, source_fps=24.0)
    first.close()
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix="vfx-tests/projects/BucketShot/")["Contents"]]  # fmt: skip
    assert "vfx-tests/projects/BucketShot/source/frames/frame_0004.png" in keys
    assert "vfx-tests/projects/BucketShot/source/manifest.json" in keys

    second = Project("BucketShot", settings, bucket)  # a later job: a fresh working copy
    assert second.frame_files() == []
    assert second.pull("source") == 5
    assert read_manifest(second).frame_count == 4
    assert [f.path for f in second.list_files("source/frames")][
        -1
    ] == "source/frames/frame_0004.png"
    second.close()


# --------------------------------------------------------------------------------------------
# camera export


def truth_solve(clip: OrbitClip, drop: int) -> tuple[Any, Intrinsics, list[Any]]:
    from dataclasses import dataclass

    from core.stages.ingest import Ingested, IngestedFrame

    @dataclass
    class Pose:
        frame: int
        registered: bool
        world_to_camera: np.ndarray | None
        reprojection_error: float | None

    ingested = Ingested(clip.width, clip.height, clip.fps, clip.fps)
    poses = []
    for i, (rot, t) in enumerate(clip.poses):
        ingested.frames.append(IngestedFrame(i + 1, 2 * i, 2 * i / clip.fps))
        matrix = np.eye(4)
        matrix[:3, :3], matrix[:3, 3] = rot, t
        poses.append(Pose(i, i != drop, matrix if i != drop else None, 0.3))
    k = clip.k
    return ingested, Intrinsics(k[0, 0], k[1, 1], k[0, 2], k[1, 2]), poses


def test_camera_data_holds_every_frame_and_the_true_cameras(clip: OrbitClip) -> None:
    ingested, intrinsics, poses = truth_solve(clip, drop=5)
    data = json.loads(json.dumps(camera_data(ingested, intrinsics, poses)))
    assert data["frame_count"] == len(clip.poses) and data["num_cameras"] == len(clip.poses) - 1
    assert [e["source_frame"] for e in data["frames"]] == [2 * i for i in range(len(clip.poses))]
    flagged = data["frames"][5]
    assert flagged["registered"] is False and flagged["camera_to_world"] is None
    assert flagged["flag"] == "not_registered" and flagged["intrinsics"]["fx"] == clip.k[0, 0]
    for i, entry in enumerate(data["frames"]):
        if i == 5:
            continue
        rot, t = clip.poses[i]
        assert np.allclose(np.asarray(entry["world_to_camera"])[:3, :3], rot, atol=1e-8)
        assert np.allclose(np.asarray(entry["world_to_camera"])[:3, 3], t, atol=1e-8)
        # The scene convention: the centre is COLMAP's turned 180 degrees about X.
        centre = np.asarray(entry["position"])
        assert np.allclose(centre, np.diag([1, -1, -1]) @ clip.centres[i], atol=1e-6)
        # And the camera looks down its -Z: the world point ahead of the camera is in front.
        back = colmap_world_to_camera(np.asarray(entry["camera_to_world"]))
        assert np.allclose(back[:3], np.asarray(entry["world_to_camera"])[:3], atol=1e-7)


def test_nuke_chan_and_blender_script_round_trip_to_the_cameras(clip: OrbitClip) -> None:
    ingested, intrinsics, poses = truth_solve(clip, drop=3)
    data = camera_data(ingested, intrinsics, poses)
    cameras = read_chan(nuke_chan(data))
    assert sorted(cameras) == [e["frame"] for e in data["frames"] if e["registered"]]
    vfov = np.degrees(2 * np.arctan(clip.height / (2 * clip.k[1, 1])))
    for entry in data["frames"]:
        if not entry["registered"]:
            continue
        matrix, chan_vfov = cameras[entry["frame"]]
        assert abs(chan_vfov - vfov) < 1e-6
        world_to_camera = colmap_world_to_camera(matrix)
        rot, t = clip.poses[entry["frame"] - 1]
        assert np.allclose(world_to_camera[:3, :3], rot, atol=1e-7)
        assert np.allclose(world_to_camera[:3, 3], t, atol=1e-6)
    keyed = read_blender_frames(blender_script(data))
    turn = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])  # Blender's Z up back to the scene's Y up
    for item in keyed:
        rot, t = clip.poses[item["frame"] - 1]
        matrix = np.asarray(item["matrix_world"])
        scene = np.eye(4)
        scene[:3, :3], scene[:3, 3] = turn @ matrix[:3, :3], turn @ matrix[:3, 3]
        assert np.allclose(colmap_world_to_camera(scene)[:3, :3], rot, atol=1e-7)
    compile(blender_script(data), "camera_blender.py", "exec")  # valid Python for Blender


def test_zxy_euler_inverts_on_many_rotations() -> None:
    rng = np.random.default_rng(4)
    for _ in range(200):
        rx, ry, rz = rng.uniform(-89, 89), rng.uniform(-180, 180), rng.uniform(-180, 180)
        assert np.allclose(euler_zxy(rotation_zxy(rx, ry, rz)), (rx, ry, rz), atol=1e-7)
    # Z is applied first: a pure rz turns +X toward +Y, then ry swings that about Y.
    assert np.allclose(rotation_zxy(0, 90, 90) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    matrix = np.eye(4)
    assert np.allclose(scene_camera_to_world(matrix)[:3, :3], np.eye(3))  # COLMAP's +Z ahead -> -Z


# --------------------------------------------------------------------------------------------
# roto files, matte, clean plate


def test_roto_writes_one_mask_per_frame_per_concept_and_instance(
    tmp_path: Path, clip: OrbitClip
) -> None:
    numbers = list(range(1, len(clip.masks) + 1))
    per_frame = []
    for i, mask in enumerate(clip.masks):
        left = mask.copy()
        left[:, clip.width // 2 :] = False
        right = mask & ~left
        instances = [RotoInstance("person", 1, left), RotoInstance("person", 2, right)]
        if i % 2 == 0:
            instances.append(RotoInstance("red car", 7, np.roll(mask, 5, axis=0)))
        per_frame.append(instances)
    result = write_roto(
        per_frame, ["person", "red car"], tmp_path / "roto", numbers, (clip.height, clip.width)
    )
    assert result.mask_count == 2 * len(numbers)
    assert result.concepts == {"person": "person", "red car": "red_car"}
    assert result.instances == {"person": ["id_1", "id_2"], "red_car": ["id_7"]}
    assert len(list((tmp_path / "roto/red_car/id_7").glob("*.png"))) == len(numbers[::2])
    assert len(list((tmp_path / "roto/red_car").glob("mask_*.png"))) == len(numbers)
    for i, combined in enumerate(read_combined(tmp_path / "roto", numbers)):
        truth = clip.masks[i] | (np.roll(clip.masks[i], 5, axis=0) if i % 2 == 0 else False)
        assert np.array_equal(combined, truth)
        person = read_image(tmp_path / f"roto/person/mask_{i + 1:04d}.png", 0) > 127
        iou = (person & clip.masks[i]).sum() / max(1, (person | clip.masks[i]).sum())
        assert iou == 1.0


def soft_composite(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured foreground disc over a different background with a known soft edge."""
    rng = np.random.default_rng(seed)
    height, width = 120, 160
    yy, xx = np.mgrid[0:height, 0:width]
    distance = np.hypot(xx - 80, yy - 60) - 35.0
    alpha = np.clip(0.5 - distance / 6.0, 0.0, 1.0)  # a 6 px ramp
    fg = np.empty((height, width, 3), np.float64)
    fg[:] = (40, 60, 220)
    fg += random_texture(rng, height, width).astype(np.float64) * 0.1
    bg = np.empty((height, width, 3), np.float64)
    bg[:] = (200, 190, 40)
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    return np.clip(image, 0, 255).astype(np.uint8), alpha


def test_guided_filter_matte_recovers_the_soft_edge(tmp_path: Path) -> None:
    image, alpha = soft_composite()
    mask = alpha >= 0.5
    band = trimap(mask, 3, 6)
    assert set(np.unique(band)) == {0, 128, 255}
    soft = guided_alpha(image, mask, band, radius=4)
    edge = (alpha > 0.02) & (alpha < 0.98)
    hard_error = np.abs(mask.astype(float) - alpha)[edge].mean()
    soft_error = np.abs(soft - alpha)[edge].mean()
    assert soft_error < 0.06 and soft_error < 0.25 * hard_error, (soft_error, hard_error)
    assert np.all(soft[band == 255] == 1.0) and np.all(soft[band == 0] == 0.0)

    files = matte_frames([image], [mask], tmp_path, [7], method="guided_filter").files
    rgba = read_image(files[0], cv2.IMREAD_UNCHANGED)
    assert files[0].name == "matte_0007.png" and rgba.shape == (120, 160, 4)
    assert np.abs(rgba[..., 3] / 255.0 - soft).max() <= 1 / 255 + 1e-6


def test_vitmatte_loads_and_runs_or_says_why_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import (
        VitDetConfig,
        VitMatteConfig,
        VitMatteForImageMatting,
        VitMatteImageProcessor,
    )

    import core.models
    from core.config import get_settings

    weights = tmp_path / "weights"
    monkeypatch.setenv("WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("VOLUME_WEIGHTS_DIR", str(tmp_path / "volume"))
    monkeypatch.setenv("ALLOW_MODEL_DOWNLOADS", "false")
    get_settings.cache_clear()
    core.models._registry = None
    try:
        image, alpha = soft_composite()
        mask = alpha >= 0.5
        with pytest.raises(ModelUnavailable):
            matte_frames([image], [mask], tmp_path, [1], method="vitmatte")
        fallback = matte_frames([image], [mask], tmp_path, [1], method="auto")
        assert fallback.method == "guided_filter" and "ViTMatte" in (fallback.fallback_reason or "")

        torch.manual_seed(0)
        backbone = VitDetConfig(  # type: ignore[call-arg]
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            image_size=64, pretrain_image_size=64, patch_size=16, num_channels=4,
            out_features=["stage2"], window_block_indices=[], residual_block_indices=[],
            use_relative_position_embeddings=False,
        )  # fmt: skip
        config = VitMatteConfig(
            backbone_config=backbone, hidden_size=32, convstream_hidden_sizes=[8, 16, 16],
            fusion_hidden_sizes=[32, 16, 8, 8],
        )  # fmt: skip
        folder = weights / "vitmatte-small-composition-1k"
        VitMatteForImageMatting(config).save_pretrained(folder)
        VitMatteImageProcessor().save_pretrained(folder)
        core.models._registry = None
        loaded = load_matte()
        result = matte_frames([image], [mask], tmp_path, [1], method="auto")
        assert result.method == "vitmatte" and result.fallback_reason is None
        rgba = read_image(result.files[0], cv2.IMREAD_UNCHANGED)
        band = trimap(mask, 3, 6)
        assert rgba.shape == (120, 160, 4)
        assert np.all(rgba[..., 3][band == 255] == 255) and np.all(rgba[..., 3][band == 0] == 0)
        assert loaded.model.model.config.backbone_config.num_channels == 4
    finally:
        get_settings.cache_clear()
        core.models._registry = None


def pan_with_subject(
    count: int = 10,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """A tripod pan (no parallax: a homography is exact) with a textured box walking across."""
    backgrounds = pan_views(count, width=224, height=168, seed=2)
    rng = np.random.default_rng(9)
    texture = random_texture(rng, 60, 44)
    frames, masks = [], []
    for i, bg in enumerate(backgrounds):
        frame = bg.copy()
        mask = np.zeros(bg.shape[:2], bool)
        x = 20 + 14 * i
        frame[70:130, x : x + 44] = texture
        mask[70:130, x : x + 44] = True
        frames.append(frame)
        masks.append(mask)
    return frames, masks, backgrounds


def test_clean_plate_restores_the_true_background(tmp_path: Path) -> None:
    frames, masks, backgrounds = pan_with_subject()
    numbers = list(range(1, len(frames) + 1))
    result = clean_plates(frames, masks, tmp_path, numbers, dilate_px=2)
    shares = result.shares()
    assert shares["temporal_median"] > 0.95, shares
    errors, inpaint_errors = [], []
    for i, path in enumerate(result.files):
        plate = read_image(path).astype(float)
        truth = backgrounds[i].astype(float)
        errors.append(np.abs(plate - truth)[masks[i]].mean())
        hole = grow(masks[i], 2).astype(np.uint8) * 255
        inpainted = cv2.inpaint(frames[i], hole, 5, cv2.INPAINT_TELEA).astype(float)
        inpaint_errors.append(np.abs(inpainted - truth)[masks[i]].mean())
        outside = ~grow(masks[i], 2)
        assert np.array_equal(plate[outside], frames[i].astype(float)[outside])
    assert np.mean(errors) < 6.0 and np.mean(errors) < 0.3 * np.mean(inpaint_errors), (
        np.mean(errors),
        np.mean(inpaint_errors),
    )


def test_clean_plate_with_parallax_beats_inpainting(tmp_path: Path, clip: OrbitClip) -> None:
    numbers = list(range(1, len(clip.frames) + 1))
    result = clean_plates(clip.frames, clip.masks, tmp_path, numbers, dilate_px=3)
    errors, inpaint_errors = [], []
    for i, path in enumerate(result.files):
        plate = read_image(path).astype(float)
        truth = clip.background[i].astype(float)
        errors.append(np.abs(plate - truth)[clip.masks[i]].mean())
        hole = grow(clip.masks[i], 3).astype(np.uint8) * 255
        inpainted = cv2.inpaint(clip.frames[i], hole, 5, cv2.INPAINT_TELEA).astype(float)
        inpaint_errors.append(np.abs(inpainted - truth)[clip.masks[i]].mean())
    shares = result.shares()
    assert 0 < shares["temporal_median"] < 1 and abs(sum(shares.values()) - 1) < 1e-3
    assert np.mean(errors) < np.mean(inpaint_errors), (np.mean(errors), np.mean(inpaint_errors))


def test_sam3_results_become_instances_per_concept_and_track_id(clip: OrbitClip) -> None:
    """SAM 3's `Results` rows (class -> concept, track id, mask at the model's or the frame's
    size) as roto instances, model-free: random weights would give nothing to check."""
    from types import SimpleNamespace

    import torch

    from core.stages.roto import results_to_instances

    mask = clip.masks[0]
    small = cv2.resize(mask.astype(np.uint8), (96, 72), interpolation=cv2.INTER_NEAREST)
    classes, ids = torch.tensor([1.0, 0.0, 5.0]), torch.tensor([3.0, 8.0, 9.0])
    data = torch.tensor(np.stack([small, 1 - small, small]).astype(np.float32))
    result = SimpleNamespace(
        boxes=type("Boxes", (), {"__len__": lambda self: 3, "cls": classes, "id": ids})(),
        masks=SimpleNamespace(data=data),
        orig_shape=(clip.height, clip.width),
    )
    instances = results_to_instances(result, ["person", "human"])
    assert [(i.concept, i.instance_id) for i in instances] == [("human", 3), ("person", 8)]
    restored = instances[0].mask
    assert restored.shape == mask.shape
    iou = (restored & mask).sum() / (restored | mask).sum()
    assert iou > 0.9, iou
    empty = SimpleNamespace(boxes=None, masks=None, orig_shape=(4, 4))
    assert results_to_instances(empty, ["person"]) == []
