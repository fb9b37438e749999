"""Detection, segmentation and pose on video: tracking on synthetic clips with known boxes
(the tiny shapes detector), per-frame results with track ids, the Orbit app's `frames` as a
clip, the sampling options, bad video inputs, and the two real videos of ../shared/media
within a memory bound (detection with tracking, and velocity)."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.encode import rle_to_mask
from scripts.synthetic_video import SyntheticClip, moving_shapes_clip
from tests.conftest import (
    REPO,
    SHAPES_MODEL,
    WorkerRun,
    jpeg_b64,
    require_shared_media,
    scene_image,
    worker_env,
)
from tests.splat_scene import encode_mp4

needs_shapes = pytest.mark.skipif(
    not SHAPES_MODEL.exists(),
    reason="weights/shapes-yolo11.pt missing: run scripts/train_shapes_detector.py",
)

CLIP_FPS = 12.0
# Two textured shapes crossing a 320x240 frame in 2 s; seed 2 draws a triangle and a circle.
CLIP_ARGS: dict[str, Any] = dict(
    seed=2, width=320, height=240, frame_count=24, fps=CLIP_FPS, velocities=[(3, 2), (-2, 0)]
)


def synthetic_clip(**overrides: Any) -> SyntheticClip:
    args = {**CLIP_ARGS, **overrides}
    seed = args.pop("seed")
    return moving_shapes_clip(seed, shapes=len(args["velocities"]), texture=15.0, **args)


def mp4_b64(clip: SyntheticClip, path: Path) -> str:
    encode_mp4(clip.frames, path, clip.fps, crf=18)
    return base64.b64encode(path.read_bytes()).decode()


def iou(a: list[float], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_tracks(clip: SyntheticClip, result: dict[str, Any]) -> dict[int, int]:
    """shape index -> the track id whose boxes overlap that shape's true boxes most."""
    overlap: dict[tuple[int, int], list[float]] = {}
    for frame in result["frames"]:
        entries = frame.get("detections", frame.get("tracks"))
        for entry in entries:
            for s, shape in enumerate(clip.shapes):
                truth = shape.boxes[frame["frame_index"]]
                overlap.setdefault((s, entry["track_id"]), []).append(iou(entry["box"], truth))
    matched = {}
    for s in range(len(clip.shapes)):
        candidates = {t: sum(v) for (si, t), v in overlap.items() if si == s}
        matched[s] = max(candidates, key=candidates.__getitem__)
    return matched


@pytest.fixture(scope="session")
def confident_weights(weights_dir: Path) -> dict[str, str]:
    """Random-weight yolo11n{,-seg,-pose} with the `person` logit's bias raised: they find the
    same few confident boxes in every frame, so the tracker gives them ids (the plain random
    checkpoints score ~0.0002, below any tracker's threshold). Shapes, not accuracy."""
    import torch
    from ultralytics import YOLO

    names = {}
    for kind, name in (("detect", "yolo11n"), ("segment", "yolo11n-seg"), ("pose", "yolo11n-pose")):
        model = YOLO(str(weights_dir / f"{name}.pt"))
        with torch.no_grad():
            for branch in model.model.model[-1].cv3:
                branch[-1].bias[0] = 6.0
        target = f"{name}-confident.pt"
        model.save(weights_dir / target)
        names[kind] = target
    return names


# ----------------------------------------------------------------------------------------------
# Detection with tracking on known truth


@needs_shapes
def test_detection_tracks_each_shape_through_sdk(worker, tmp_path: Path) -> None:
    clip = synthetic_clip()
    run = worker(
        {
            "task": "object-detection",
            "model": "shapes-yolo11.pt",
            "video": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {"threshold": 0.5, "imgsz": 320},
        }
    )
    assert run.returncode == 0, run.output
    result = run.result
    assert result["tracker"] == "bytetrack.yaml"
    video = result["video"]
    assert (video["width"], video["height"], video["frame_count"]) == (320, 240, 24)
    assert video["fps"] == pytest.approx(CLIP_FPS) and video["sampled_frames"] == 24
    frames = result["frames"]
    assert [f["frame_index"] for f in frames] == list(range(24))
    assert [f["time_s"] for f in frames] == pytest.approx(
        [i / CLIP_FPS for i in range(24)], abs=1e-3
    )

    matched = match_tracks(clip, result)
    assert len(set(matched.values())) == len(clip.shapes)  # a different id per shape
    for s, shape in enumerate(clip.shapes):
        track_id = matched[s]
        hits = [
            (frame["frame_index"], d)
            for frame in frames
            for d in frame["detections"]
            if d["track_id"] == track_id
        ]
        # One id follows the shape through the whole clip (ByteTrack confirms new tracks on
        # the first frame) with the right label, and the boxes sit on the true ones.
        assert [index for index, _ in hits] == list(range(24)), shape.class_name
        assert {d["label"] for _, d in hits} == {shape.class_name}
        ious = [iou(d["box"], shape.boxes[index]) for index, d in hits]
        assert min(ious) >= 0.75, (shape.class_name, min(ious))
        summary = next(t for t in result["tracks"] if t["track_id"] == track_id)
        assert summary["frames_seen"] == 24 and summary["label"] == shape.class_name
        assert (summary["first_frame"], summary["last_frame"]) == (0, 23)
    # No phantom tracks beside the two shapes.
    assert {t["track_id"] for t in result["tracks"]} == set(matched.values())


@needs_shapes
@pytest.mark.parametrize("tracker", ["botsort", "ocsort"])
def test_other_trackers_are_named_and_keep_ids(inprocess, tmp_path: Path, tracker: str) -> None:
    clip = synthetic_clip(frame_count=12)
    result = inprocess(
        {
            "task": "object-detection",
            "model": "shapes-yolo11.pt",
            "video": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {"threshold": 0.5, "imgsz": 320, "tracker": tracker},
        }
    )
    assert "error" not in result, result
    assert result["tracker"] == f"{tracker}.yaml"
    matched = match_tracks(clip, result)
    assert len(set(matched.values())) == 2
    for track_id in matched.values():
        seen = [
            f for f in result["frames"] if any(d["track_id"] == track_id for d in f["detections"])
        ]
        assert len(seen) >= 11  # OC-SORT confirms a new track one frame later than ByteTrack


@needs_shapes
def test_frames_list_is_a_clip(inprocess) -> None:
    """The Orbit app's shape: images in order with the clip's `fps` at the top level."""
    clip = synthetic_clip(frame_count=12)
    result = inprocess(
        {
            "task": "object-detection",
            "model": "shapes-yolo11.pt",
            "frames": [jpeg_b64(f) for f in clip.frames],
            "fps": 6,
            "options": {"threshold": 0.5, "imgsz": 320, "fps": 3},
        }
    )
    assert "error" not in result, result
    video = result["video"]
    assert video["source"] == "frames" and video["frame_count"] == 12
    assert video["fps"] == 6 and video["duration_s"] == pytest.approx(2.0)
    # Sampled at 3 of 6 fps: every other image, times from the declared rate.
    assert [f["frame_index"] for f in result["frames"]] == list(range(0, 12, 2))
    assert [f["time_s"] for f in result["frames"]] == pytest.approx(
        [i / 6 for i in range(0, 12, 2)], abs=1e-4
    )
    matched = match_tracks(clip, result)
    for s, track_id in matched.items():
        boxes = [
            (f["frame_index"], d["box"])
            for f in result["frames"]
            for d in f["detections"]
            if d["track_id"] == track_id
        ]
        assert len(boxes) == 6
        assert min(iou(box, clip.shapes[s].boxes[i]) for i, box in boxes) >= 0.75


@needs_shapes
def test_sampling_options_are_honoured(inprocess, tmp_path: Path) -> None:
    video = mp4_b64(synthetic_clip(), tmp_path / "clip.mp4")  # 24 frames at 12 fps

    def frames(**options: Any) -> dict[str, Any]:
        result = inprocess(
            {
                "task": "object-detection",
                "model": "shapes-yolo11.pt",
                "video": video,
                "options": {"imgsz": 320, **options},
            }
        )
        assert "error" not in result, result
        return result

    windowed = frames(fps=4, start_sec=0.5, end_sec=1.5)
    assert [f["frame_index"] for f in windowed["frames"]] == [6, 9, 12, 15]
    assert [f["time_s"] for f in windowed["frames"]] == pytest.approx([0.5, 0.75, 1.0, 1.25])
    assert windowed["video"]["sampled_frames"] == 4
    assert windowed["video"]["sample_fps"] == 4 and windowed["video"]["start_sec"] == 0.5

    capped = frames(max_frames=3, start_sec=1.0)
    assert [f["frame_index"] for f in capped["frames"]] == [12, 13, 14]
    assert [t["frames_seen"] for t in capped["tracks"]] == [3, 3]


@needs_shapes
def test_long_per_frame_output_becomes_an_artifact(
    inprocess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("OUTPUT_DIR", str(out))
    monkeypatch.setenv("FRAMES_INLINE_MAX_BYTES", "200")
    inprocess.reset()
    clip = synthetic_clip(frame_count=6)
    result = inprocess(
        {
            "task": "object-detection",
            "model": "shapes-yolo11.pt",
            "video": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {"imgsz": 320},
        }
    )
    assert "frames" not in result and result["frames_count"] == 6
    artifact = result["frames_artifact"]
    assert artifact["name"] == "frames.json" and artifact["content_type"] == "application/json"
    saved = json.loads(Path(artifact["path"]).read_text())
    assert [f["frame_index"] for f in saved] == list(range(6))
    assert all(len(f["detections"]) == 2 for f in saved)


# ----------------------------------------------------------------------------------------------
# Segmentation and pose on video (random weights made confident: shapes, not accuracy)


def test_segmentation_on_video_has_masks_and_track_ids(
    inprocess, confident_weights: dict[str, str], tmp_path: Path
) -> None:
    clip = synthetic_clip(frame_count=5)
    result = inprocess(
        {
            "task": "image-segmentation",
            "model": confident_weights["segment"],
            "video": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {"imgsz": 320, "max_det": 3, "mask_format": "rle"},
        }
    )
    assert "error" not in result, result
    frames = result["frames"]
    assert [f["frame_index"] for f in frames] == list(range(5))
    ids_per_frame = [sorted(d["track_id"] for d in f["detections"]) for f in frames]
    assert all(len(ids) == 3 for ids in ids_per_frame)
    assert all(ids == ids_per_frame[0] for ids in ids_per_frame)  # the same boxes keep their ids
    for frame in frames:
        for detection in frame["detections"]:
            mask = rle_to_mask(detection["mask"])
            assert mask.shape == (240, 320) and mask.any()
    assert sorted(t["track_id"] for t in result["tracks"]) == ids_per_frame[0]
    assert all(t["frames_seen"] == 5 for t in result["tracks"])


def test_pose_on_video_has_keypoints_and_track_ids(
    inprocess, confident_weights: dict[str, str], tmp_path: Path
) -> None:
    clip = synthetic_clip(frame_count=4)
    result = inprocess(
        {
            "task": "pose-estimation",
            "model": confident_weights["pose"],
            "video": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {"imgsz": 320, "max_det": 2},
        }
    )
    assert "error" not in result, result
    assert result["tracker"] == "bytetrack.yaml"
    for frame in result["frames"]:
        assert len(frame["detections"]) == 2
        for detection in frame["detections"]:
            assert isinstance(detection["track_id"], int)
            assert [k["name"] for k in detection["keypoints"]][:3] == [
                "nose",
                "left_eye",
                "right_eye",
            ]
            assert len(detection["keypoints"]) == 17
    assert len(result["tracks"]) == 2


def test_track_false_gives_plain_per_frame_detections(
    inprocess, confident_weights: dict[str, str], tmp_path: Path
) -> None:
    clip = synthetic_clip(frame_count=3)
    result = inprocess(
        {
            "task": "object-detection",
            "model": confident_weights["detect"],
            "video": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {"imgsz": 320, "max_det": 2, "track": False},
        }
    )
    assert result["tracker"] is None and result["tracks"] == []
    assert all(len(f["detections"]) == 2 for f in result["frames"])
    assert all("track_id" not in d for f in result["frames"] for d in f["detections"])


# ----------------------------------------------------------------------------------------------
# Bad video inputs


def faststart_mp4(clip: SyntheticClip, path: Path) -> bytes:
    """An mp4 with its index (moov) first, as web video is: a cut file still opens."""
    import av

    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=int(clip.fps))
        stream.width, stream.height = clip.frames[0].shape[1], clip.frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for pixels in clip.frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


@pytest.mark.parametrize("task", ["object-detection", "velocity-estimation"])
def test_bad_video_inputs_fail_clearly(inprocess, tmp_path: Path, task: str) -> None:
    clip = synthetic_clip(frame_count=12)
    encode_mp4(clip.frames, tmp_path / "clip.mp4", clip.fps, crf=18)
    good = (tmp_path / "clip.mp4").read_bytes()
    assert good[:64].find(b"moov") < 0  # PyAV writes the index last: a cut file has none
    faststart = faststart_mp4(clip, tmp_path / "faststart.mp4")
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    options = {"imgsz": 320, "flow": "dis"} if task == "velocity-estimation" else {"imgsz": 320}
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("zero bytes", {"video": "data:video/mp4;base64,"}, "media_decode_failed", "empty"),
        ("empty string", {"video": ""}, "invalid_input", "empty"),
        ("truncated mp4", {"video": b64(good[: len(good) // 2])}, "media_decode_failed", "video"),
        (
            "truncated faststart mp4",
            {"video": b64(faststart[: len(faststart) // 2])},
            "media_decode_failed",
            "decoding failed",
        ),
        (
            "an image sent as video",
            {"video": jpeg_b64(scene_image())},
            "media_decode_failed",
            "image/jpeg, not a video",
        ),
        (
            "0 frames after trim",
            {"video": b64(good), "options": {**options, "start_sec": 5.0}},
            "invalid_input",
            "no frames in the window",
        ),
        (
            "start after end",
            {"video": b64(good), "options": {**options, "start_sec": 1.5, "end_sec": 0.5}},
            "invalid_input",
            "options: end_sec (0.5) must be after start_sec (1.5)",
        ),
        (
            "garbage frames",
            {"frames": [jpeg_b64(clip.frames[0]), b64(b"not an image at all")]},
            "media_decode_failed",
            "frames[1]",
        ),
    ]
    for name, media, code, words in cases:
        job = {"task": task, "model": "yolo11n.pt", "options": options, **media}
        result = inprocess(job)
        assert result.get("error_code") == code, (name, result)
        assert words in result["error"], (name, result["error"])
        assert "timings_ms" in result
    # The same process still serves a good clip.
    ok = inprocess({"task": task, "model": "yolo11n.pt", "video": b64(good), "options": options})
    assert "error" not in ok, ok
    assert ok["video"]["sampled_frames"] == 12


def test_truncated_video_through_sdk_is_a_clean_failure(worker, tmp_path: Path) -> None:
    clip = synthetic_clip(frame_count=6)
    data = faststart_mp4(clip, tmp_path / "faststart.mp4")
    run = worker(
        {"task": "object-detection", "video": base64.b64encode(data[: len(data) // 2]).decode()}
    )
    # The SDK's local mode exits 1 for a FAILED job; the job's result says why, no traceback.
    assert run.returncode == 1, run.output
    assert run.result["error_code"] == "media_decode_failed"
    assert run.result["error"].startswith("media_decode_failed: video: decoding failed")
    assert "Traceback" not in run.output


# ----------------------------------------------------------------------------------------------
# Real footage, within memory


def _peak_rss_mib(pid: int) -> float | None:
    """VmHWM: the process's own peak RSS since its exec (ru_maxrss would also count the RSS of
    the forked copy of this test process before the exec, large after the SAM 3 tests)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return None


def run_worker_measured(
    job_input: dict[str, Any], env: dict[str, str], timeout: float = 240
) -> tuple[WorkerRun, float]:
    """The SDK's local mode as in conftest's `run_worker`, also returning the worker's own peak
    RSS in MiB, read from /proc while it runs (the peak only grows, so the last read holds)."""
    result_path = Path(env["RESULT_PATH"])
    result_path.unlink(missing_ok=True)
    log_path = result_path.with_suffix(".log")
    # A real video is over the OS's argument limit: the SDK's other local mode reads
    # test_input.json from the working directory.
    job_dir = result_path.parent / "job"
    job_dir.mkdir(exist_ok=True)
    (job_dir / "test_input.json").write_text(json.dumps({"input": job_input}))
    command = [sys.executable, str(REPO / "handlers/infer.py")]
    peak = 0.0
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=job_dir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                break
            reading = _peak_rss_mib(process.pid)
            if reading is not None:
                peak = max(peak, reading)
            time.sleep(0.1)
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    output = log_path.read_text()
    assert peak > 0, "the worker's memory could not be read"
    return WorkerRun(process.returncode, result, output), peak


# The worker with torch, torchvision, Ultralytics and OpenCV loaded sits near 0.7 GiB; a
# 1080p clip decoded one frame at a time, RAFT at 640 px and the results add a few hundred
# MiB. A clip held whole in memory (300 1080p frames = 1.8 GiB) would break this bound.
PEAK_RSS_LIMIT_MIB = 1800


@pytest.mark.parametrize(
    ("name", "window"),
    [
        ("sam2_01_dog_walk.mp4", {"start_sec": 2.0, "end_sec": 5.0}),
        ("street_pedestrians_cyclist_1080p.mp4", {"start_sec": 4.0, "end_sec": 7.0}),
    ],
)
def test_real_videos_detection_and_velocity_within_memory(
    weights_dir: Path,
    confident_weights: dict[str, str],
    tmp_path: Path,
    name: str,
    window: dict[str, float],
) -> None:
    from scripts.make_test_weights_raft import make_raft_checkpoint

    path = require_shared_media(name)
    if not (weights_dir / "raft_small.pth").exists():
        make_raft_checkpoint(weights_dir)
    video = base64.b64encode(path.read_bytes()).decode()
    env = worker_env(weights_dir, tmp_path)

    detect, detect_rss = run_worker_measured(
        {
            "task": "object-detection",
            "model": confident_weights["detect"],
            "video": video,
            "options": {**window, "fps": 2, "max_det": 5},
        },
        env,
    )
    assert detect.returncode == 0, detect.output
    assert "error" not in detect.result, detect.result
    frames = detect.result["frames"]
    assert len(frames) == 6  # 3 s at 2 fps
    assert all(
        b["time_s"] - a["time_s"] == pytest.approx(0.5, abs=0.04)
        for a, b in itertools.pairwise(frames)
    )
    assert all(len(f["detections"]) == 5 for f in frames)
    assert len(detect.result["tracks"]) >= 5
    assert all(d["track_id"] >= 1 for f in frames for d in f["detections"])

    velocity, velocity_rss = run_worker_measured(
        {
            "task": "velocity-estimation",
            "model": confident_weights["detect"],
            "video": video,
            "options": {**window, "fps": 2, "max_det": 3, "max_pairs": 2, "flow": "raft"},
        },
        env,
    )
    assert velocity.returncode == 0, velocity.output
    assert "error" not in velocity.result, velocity.result
    result = velocity.result
    assert result["flow"]["backend"] == "raft" and result["flow"]["pairs"] == 2
    assert max(result["flow"]["working_size"]) == 640
    measured = [t for f in result["frames"][:-1] for t in f["tracks"]]
    assert measured and all(np.isfinite(t["speed_mps"]) for t in measured)
    print(
        json.dumps(
            {
                "video": name,
                "detect_peak_rss_mib": round(detect_rss),
                "velocity_peak_rss_mib": round(velocity_rss),
            }
        )
    )
    assert detect_rss < PEAK_RSS_LIMIT_MIB
    assert velocity_rss < PEAK_RSS_LIMIT_MIB


def test_a_clip_cut_short_warns_that_frames_are_missing(inprocess, tmp_path: Path) -> None:
    # A web-style mp4 (index first) cut near its end still decodes, but only its first frames:
    # the result must say so, not pass for a shorter clip.
    clip = synthetic_clip(frame_count=24)
    whole = faststart_mp4(clip, tmp_path / "faststart.mp4")
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    job = {"task": "object-detection", "model": "yolo11n.pt", "options": {"imgsz": 320}}

    complete = inprocess({**job, "video": b64(whole)})
    assert "error" not in complete, complete
    assert complete["video"]["sampled_frames"] == 24
    assert not any("cut short" in w for w in complete.get("warnings", []))

    cut = inprocess({**job, "video": b64(whole[: int(len(whole) * 0.95)])})
    assert "error" not in cut, cut
    assert cut["video"]["sampled_frames"] < 20
    assert any("cut short or damaged" in w for w in cut["warnings"]), cut.get("warnings")
