"""velocity-estimation: known speeds from synthetic clips (textured shapes moving at known
pixels per frame, found by the tiny shapes detector, flow by OpenCV DIS), the true time
between sampled frames, camera-pan subtraction, and the RAFT path on a random-weight
torchvision checkpoint loaded through WEIGHTS_DIR (wiring, padding, scaling, shapes)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.tasks._flow import core_region, median_flow, pad_amounts, to_raft_input
from scripts.synthetic_video import SyntheticClip
from tests.conftest import jpeg_b64
from tests.test_video_tasks import CLIP_FPS, match_tracks, mp4_b64, needs_shapes, synthetic_clip

MPP = 0.05  # the Studio's default meter_per_pixel


@pytest.fixture(scope="session")
def raft_weights(weights_dir: Path) -> Path:
    """A random-weight raft_small state dict saved with torch.save, as WEIGHTS_DIR holds it."""
    from scripts.make_test_weights_raft import make_raft_checkpoint

    path = weights_dir / "raft_small.pth"
    return path if path.exists() else make_raft_checkpoint(weights_dir)


def true_speed(clip: SyntheticClip, index: int, fps: float = CLIP_FPS) -> float:
    """m/s of a shape moving at (vx, vy) pixels per source frame."""
    return math.hypot(*clip.shapes[index].velocity) * fps * MPP


def track_of(result: dict[str, Any], track_id: int) -> dict[str, Any]:
    return next(t for t in result["tracks"] if t["track_id"] == track_id)


def assert_speeds(
    clip: SyntheticClip, result: dict[str, Any], fps: float = CLIP_FPS, rel: float = 0.10
) -> None:
    """Every shape's track: mean, median and every sample within `rel` of the truth, and the
    velocity vector pointing the way the shape moves."""
    matched = match_tracks(clip, result)
    assert len(set(matched.values())) == len(clip.shapes)
    for index, track_id in matched.items():
        track = track_of(result, track_id)
        truth = true_speed(clip, index, fps)
        assert track["label"] == clip.shapes[index].class_name
        assert track["mean_speed_mps"] == pytest.approx(truth, rel=rel), track
        assert track["median_speed_mps"] == pytest.approx(truth, rel=rel)
        assert track["max_speed_mps"] <= truth * (1 + rel)
        vx, vy = (v * fps * MPP for v in clip.shapes[index].velocity)
        for sample in track["speeds"]:
            assert sample["speed_mps"] == pytest.approx(truth, rel=rel), sample
            assert sample["velocity_mps"] == pytest.approx([vx, vy], abs=rel * truth), sample


@needs_shapes
def test_known_speed_with_dis_through_sdk(worker, tmp_path: Path) -> None:
    """The Studio's options (its shape is in tests/test_studio.py, where `model` names the
    flow model); the clip as `media`; 3 and -2 px/frame at 12 fps, 0.05 m/px."""
    clip = synthetic_clip()  # a triangle at (3, 2) px/frame, a circle at (-2, 0)
    run = worker(
        {
            "task": "velocity-estimation",
            "model": "shapes-yolo11.pt",
            "media": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {
                "threshold": 0.5,
                "max_frames": 121,
                "max_pairs": 120,
                "meter_per_pixel": MPP,
                "imgsz": 320,
                "flow": "dis",
            },
        }
    )
    assert run.returncode == 0, run.output
    result = run.result
    assert result["task"] == "velocity-estimation" and result["speed_unit"] == "m/s"
    assert result["flow"] == {
        "backend": "dis",
        "model": None,
        "working_size": [320, 240],
        "pairs": 23,
    }
    assert result["tracker"] == "bytetrack.yaml" and result["meter_per_pixel"] == MPP
    assert result["video"]["sampled_frames"] == 24
    assert {"decode", "inference", "flow", "total"} <= set(result["timings_ms"])
    assert_speeds(clip, result)

    for index, track_id in match_tracks(clip, result).items():
        track = track_of(result, track_id)
        # A speed for every pair: frames 0..22, each over one frame interval.
        assert [s["frame_index"] for s in track["speeds"]] == list(range(23))
        assert all(s["dt_s"] == pytest.approx(1 / CLIP_FPS, abs=1e-4) for s in track["speeds"])
        assert track["distance_m"] == pytest.approx(
            true_speed(clip, index) * 23 / CLIP_FPS, rel=0.1
        )
    # Per frame: the tracks present with their speed; the last frame has none to measure.
    frames = result["frames"]
    assert [f["frame_index"] for f in frames] == list(range(24))
    assert all(len(f["tracks"]) == 2 for f in frames)
    assert all(isinstance(t["speed_mps"], float) for f in frames[:-1] for t in f["tracks"])
    assert all(t["speed_mps"] is None for t in frames[-1]["tracks"])


@needs_shapes
def test_speed_uses_the_true_time_between_sampled_frames(inprocess, tmp_path: Path) -> None:
    clip = synthetic_clip(frame_count=16)
    options = {"flow": "dis", "imgsz": 320}

    # Every other frame (fps 6 of 12): twice the pixels over twice the time, same speed.
    halved = inprocess(
        {
            "task": "velocity-estimation",
            "model": "shapes-yolo11.pt",
            "video": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {**options, "fps": 6},
        }
    )
    assert "error" not in halved, halved
    assert [f["frame_index"] for f in halved["frames"]] == list(range(0, 16, 2))
    assert all(
        s["dt_s"] == pytest.approx(2 / CLIP_FPS, abs=1e-4)
        for t in halved["tracks"]
        for s in t["speeds"]
    )
    assert_speeds(clip, halved)

    # The same images as the Orbit app's `frames` declared at 24 fps: the motion happens in
    # half the time, so twice the speed.
    doubled = inprocess(
        {
            "task": "velocity-estimation",
            "model": "shapes-yolo11.pt",
            "frames": [jpeg_b64(f, quality=95) for f in clip.frames],
            "fps": 24,
            "options": options,
        }
    )
    assert "error" not in doubled, doubled
    assert doubled["video"]["source"] == "frames"
    assert_speeds(clip, doubled, fps=24)


@needs_shapes
def test_camera_pan_is_subtracted_on_request(inprocess, tmp_path: Path) -> None:
    """A camera panning right at 2 px/frame: the background moves -2 px/frame in the image
    and every shape 2 px/frame less than over the ground."""
    wide = synthetic_clip(width=400)
    frames = [frame[:, 2 * t : 2 * t + 320] for t, frame in enumerate(wide.frames)]
    panned = SyntheticClip(frames, wide.fps, wide.shapes)  # truth: motion over the ground
    video = mp4_b64(panned, tmp_path / "pan.mp4")

    def run(subtract: bool) -> dict[str, Any]:
        result = inprocess(
            {
                "task": "velocity-estimation",
                "model": "shapes-yolo11.pt",
                "video": video,
                "options": {"flow": "dis", "imgsz": 320, "subtract_background": subtract},
            }
        )
        assert "error" not in result, result
        return result

    ground = run(True)
    assert ground["camera_motion"] == "subtracted"
    image = run(False)
    assert image["camera_motion"] == "not subtracted"
    for index, shape in enumerate(wide.shapes):
        on_ground = track_of(ground, match_tracks(wide_in_crop(wide), ground)[index])
        assert on_ground["median_speed_mps"] == pytest.approx(true_speed(wide, index), rel=0.1)
        in_image = track_of(image, match_tracks(wide_in_crop(wide), image)[index])
        vx, vy = shape.velocity[0] - 2, shape.velocity[1]
        expected = math.hypot(vx, vy) * CLIP_FPS * MPP
        assert in_image["median_speed_mps"] == pytest.approx(expected, rel=0.1)


def wide_in_crop(wide: SyntheticClip) -> SyntheticClip:
    """The wide clip's true boxes in the panning crop's coordinates."""
    from scripts.synthetic_video import MovingShape

    shapes = [
        MovingShape(
            s.class_name,
            (s.velocity[0] - 2, s.velocity[1]),
            [(x1 - 2 * t, y1, x2 - 2 * t, y2) for t, (x1, y1, x2, y2) in enumerate(s.boxes)],
        )
        for s in wide.shapes
    ]
    return SyntheticClip(wide.frames, wide.fps, shapes)


# ----------------------------------------------------------------------------------------------
# RAFT


@needs_shapes
def test_raft_path_through_sdk_with_preload(worker, raft_weights: Path) -> None:
    """Odd frame sizes (321x241) through RAFT, the model preloaded at start-up; random
    weights, so the numbers are checked for shape and finiteness only."""
    clip = synthetic_clip(width=321, height=241, frame_count=3)
    run = worker(
        {
            "task": "velocity-estimation",
            "model": "shapes-yolo11.pt",
            "frames": [jpeg_b64(f) for f in clip.frames],
            "fps": CLIP_FPS,
            "options": {"imgsz": 352},  # larger than the frames: flow at their own size
        },
        PRELOAD_MODELS="velocity-estimation=shapes-yolo11.pt",
    )
    assert run.returncode == 0, run.output
    assert "loaded torchvision-raft model raft_small.pth" in run.output
    result = run.result
    assert result["flow"] == {
        "backend": "raft",
        "model": "raft_small.pth",
        "working_size": [321, 241],
        "pairs": 2,
    }
    assert result["timings_ms"]["load_model"] < 1000  # preloaded, not loaded by the job
    frames = result["frames"]
    assert len(frames) == 3 and all(len(f["tracks"]) == 2 for f in frames)
    for frame in frames[:2]:
        for entry in frame["tracks"]:
            assert math.isfinite(entry["speed_mps"])
            assert entry["speed_mps"] == pytest.approx(math.hypot(*entry["velocity_mps"]), abs=1e-3)
    assert all(len(t["speeds"]) == 2 for t in result["tracks"])


def test_pad_amounts_reach_multiples_of_8_and_rafts_minimum() -> None:
    # (left, right, top, bottom); RAFT's 4-level pyramid needs at least 128 px a side.
    assert pad_amounts(97, 161, 128) == (3, 4, 15, 16)  # -> 128 x 168
    assert pad_amounts(241, 321, 128) == (3, 4, 3, 4)  # -> 248 x 328
    assert pad_amounts(360, 640, 128) == (0, 0, 0, 0)
    assert pad_amounts(100, 100) == (2, 2, 2, 2)


def test_raft_input_is_rgb_scaled_to_minus_one_one() -> None:
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[..., 0] = 255  # pure blue in BGR
    tensor = to_raft_input(pixels)
    assert tuple(tensor.shape) == (1, 3, 2, 3)
    assert tensor[0, :, 0, 0].tolist() == [-1.0, -1.0, 1.0]  # R, G, B


@pytest.mark.parametrize(("height", "width"), [(97, 161), (241, 321)])
def test_raft_flow_matches_torchvision_on_padded_input(
    inprocess, raft_weights: Path, height: int, width: int
) -> None:
    """Our RAFT call equals torchvision's model on the hand-padded pair, cropped back; the
    bare model refuses the unpadded pair."""
    import torch
    import torch.nn.functional as F

    from core.tasks._flow import RaftFlow, load_raft

    loaded = load_raft()
    assert loaded.path == raft_weights
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    second = np.roll(first, 2, axis=1)
    ours = RaftFlow(loaded, "cpu", iterations=2)(first, second)
    assert ours.shape == (height, width, 2) and ours.dtype == np.float32

    pads = {(97, 161): (3, 4, 15, 16), (241, 321): (3, 4, 3, 4)}[(height, width)]
    batch = torch.cat([to_raft_input(first), to_raft_input(second)])
    padded = F.pad(batch, pads, mode="replicate")
    with torch.inference_mode():
        expected = loaded.model(padded[:1], padded[1:], num_flow_updates=2)[-1][0]
        with pytest.raises(ValueError):
            loaded.model(batch[:1], batch[1:], num_flow_updates=2)
    left, _, top, _ = pads
    expected = expected[:, top : top + height, left : left + width].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_missing_raft_is_model_unavailable_with_a_way_out(
    inprocess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-weights"
    empty.mkdir()
    monkeypatch.setenv("WEIGHTS_DIR", str(empty))
    inprocess.reset()
    clip = synthetic_clip(frame_count=3)
    result = inprocess({"task": "velocity-estimation", "video": mp4_b64(clip, tmp_path / "c.mp4")})
    assert result["error_code"] == "model_unavailable"
    assert str(empty / "raft_small.pth") in result["error"]
    assert 'options.flow: "dis"' in result["error"]


# ----------------------------------------------------------------------------------------------
# Options and the per-box statistic


def test_studio_defaults_and_option_errors(inprocess, tmp_path: Path) -> None:
    from core.tasks.velocity import VelocityOptions

    defaults, warnings = VelocityOptions.parse({"text_prompt": "car"}, "velocity-estimation")
    assert (defaults.threshold, defaults.max_frames, defaults.max_pairs) == (0.5, 121, 120)
    assert (defaults.meter_per_pixel, defaults.imgsz, defaults.flow) == (0.05, 640, "raft")
    assert defaults.tracker == "bytetrack" and warnings == [
        "options.text_prompt is not used by velocity-estimation"
    ]
    assert VelocityOptions.parse({"flow": "DIS"}, "v")[0].flow == "dis"

    video = mp4_b64(synthetic_clip(frame_count=4), tmp_path / "c.mp4")
    for options, words in [
        ({"max_pairs": 0}, "options.max_pairs"),
        ({"meter_per_pixel": 0}, "options.meter_per_pixel"),
        ({"flow": "farneback"}, "options.flow"),
        ({"track": False}, "options.track"),
        ({"max_frames": 1}, "options.max_frames"),
        ({"flow": "dis", "start_sec": 0.2}, "velocity needs at least 2 sampled frames"),
    ]:
        result = inprocess({"task": "velocity-estimation", "video": video, "options": options})
        assert result.get("error_code") == "invalid_input", (options, result)
        assert words in result["error"], (options, result["error"])
    image = inprocess(
        {"task": "velocity-estimation", "image": jpeg_b64(np.zeros((64, 64, 3), np.uint8))}
    )
    assert image["error_code"] == "invalid_input" and "takes `video`" in image["error"]


@needs_shapes
def test_max_pairs_caps_the_sampled_frames(inprocess, tmp_path: Path) -> None:
    clip = synthetic_clip(frame_count=10)
    result = inprocess(
        {
            "task": "velocity-estimation",
            "model": "shapes-yolo11.pt",
            "video": mp4_b64(clip, tmp_path / "c.mp4"),
            "options": {"flow": "dis", "imgsz": 320, "max_pairs": 3},
        }
    )
    assert result["video"]["sampled_frames"] == 4 and result["flow"]["pairs"] == 3
    assert "max_pairs=3 caps the clip at 4 sampled frames" in result["warnings"]
    assert all(len(t["speeds"]) == 3 for t in result["tracks"])


def test_median_flow_in_the_box_core_ignores_background() -> None:
    """A diamond (like most silhouettes, it leaves the box's corners to the background) fills
    40% of its box and moves (4, -1); the background does not move."""
    flow = np.zeros((100, 120, 2), np.float32)
    box = (20.0, 10.0, 80.0, 70.0)
    ys, xs = np.mgrid[0:100, 0:120]
    inside = np.abs(xs + 0.5 - 50) + np.abs(ys + 0.5 - 40) < 27
    flow[inside] = (4.0, -1.0)
    region = core_region(box, 120, 100, 0.5)
    assert region == (35, 25, 65, 55)
    assert median_flow(flow, region) == (4.0, -1.0)
    # Over the whole box the background is the majority: its median says "not moving".
    assert median_flow(flow, (20, 10, 80, 70)) == (0.0, 0.0)
    # A box hanging over the frame's edge is clipped to it, never empty.
    assert core_region((110.0, 90.0, 140.0, 130.0), 120, 100, 0.5) == (117, 99, 120, 100)
