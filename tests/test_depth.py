"""depth-estimation: a random-weight Depth Anything V2 Small (the real architecture, saved with
`save_pretrained` with its image processor) loaded through WEIGHTS_DIR and run by the worker.

What is proven: the 16-bit PNGs decode back to the values the result claims and to the
model's own output computed here with transformers; a clip's frames share one scale (a frame
repeated gives the same bytes, each PNG decodes with the clip's min/max to that frame's own
model output, the clip's range spans all frames); bad inputs and missing models get clear codes.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.encode import depth_to_png16, depth_to_uint16, png16_to_depth, uint16_to_depth
from tests.conftest import require_shared_media, scene_image
from tests.test_media import make_video

SMALL_INPUT = 140  # model input short side for the quick tests (the default is 518)


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def depth_weights(weights_dir: Path) -> Path:
    """`depth-anything-v2-small/` in the session's WEIGHTS_DIR (model + image processor)."""
    from scripts.make_test_weights_depth import make_depth_checkpoint

    return make_depth_checkpoint(weights_dir)


class Reference:
    """The checkpoint run directly with transformers, as its documentation shows."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        self.model.eval()

    def depth(self, bgr: np.ndarray, input_size: int | None = None) -> np.ndarray:
        import torch

        size = {"size": {"height": input_size, "width": input_size}} if input_size else {}
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        inputs = self.processor(images=[rgb], return_tensors="pt", **size)
        with torch.no_grad():
            outputs = self.model(**inputs)
        target = [(bgr.shape[0], bgr.shape[1])]
        post = self.processor.post_process_depth_estimation(outputs, target_sizes=target)
        return post[0]["predicted_depth"].numpy()


@pytest.fixture(scope="session")
def reference(depth_weights: Path) -> Reference:
    return Reference(depth_weights)


def png_b64(pixels: np.ndarray) -> str:
    ok, buffer = cv2.imencode(".png", pixels)  # lossless: the worker sees these exact pixels
    assert ok
    return base64.b64encode(buffer.tobytes()).decode()


def artifact_bytes(artifact: dict[str, Any]) -> bytes:
    if artifact["storage"] == "inline":
        return base64.b64decode(artifact["data"])
    assert artifact["storage"] == "local", artifact
    return Path(artifact["path"]).read_bytes()


def png_levels(data: bytes) -> np.ndarray:
    levels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert levels is not None and levels.dtype == np.uint16 and levels.ndim == 2
    return levels


def tolerance(lo: float, hi: float) -> float:
    """Half a quantisation level, plus float noise between two runs of the same model
    (another process, another batch) well under one level."""
    return (hi - lo) / 65535 * 0.5 + (hi - lo) * 2e-5 + 1e-6


def depth_job(**fields: Any) -> dict[str, Any]:
    return {"task": "depth-estimation", **fields}


# ----------------------------------------------------------------------------------------------
# The encoding alone


def test_png16_mapping_is_exact_and_documented() -> None:
    rng = np.random.default_rng(3)
    depth = rng.uniform(-2.5, 7.0, (37, 53)).astype(np.float32)
    lo, hi = float(depth.min()), float(depth.max())
    data = depth_to_png16(depth, lo, hi)
    levels = png_levels(data)
    assert levels.shape == depth.shape and levels.min() == 0 and levels.max() == 65535
    # The documented mapping, written out here: value = min + png / 65535 * (max - min).
    by_formula = lo + levels.astype(np.float64) / 65535 * (hi - lo)
    decoded = png16_to_depth(data, lo, hi)
    np.testing.assert_allclose(decoded, by_formula, rtol=0, atol=1e-6)
    assert np.abs(decoded - depth).max() <= (hi - lo) / 65535 * 0.5 + 1e-6
    # Pillow reads the same 16 bits (a client without OpenCV).
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))).astype(np.uint16), levels)
    # Outside the range clips; a flat range is all zeros and decodes to min.
    assert depth_to_uint16(np.array([[lo - 1, hi + 1]]), lo, hi).tolist() == [[0, 65535]]
    flat = np.full((4, 4), 2.0, np.float32)
    assert png_levels(depth_to_png16(flat, 2.0, 2.0)).max() == 0
    assert np.all(uint16_to_depth(np.zeros((2, 2), np.uint16), 2.0, 2.0) == 2.0)


def test_non_finite_values_are_reported_and_clipped() -> None:
    from types import SimpleNamespace

    from core.tasks.depth import value_range

    ctx = SimpleNamespace(warnings=[])
    depth = np.array([[1.0, np.nan], [3.0, np.inf]], np.float32)
    lo, hi = value_range(depth, ctx, "images[0]")  # type: ignore[arg-type]
    assert (lo, hi) == (1.0, 3.0)
    assert ctx.warnings == ["images[0]: 2 non-finite depth values clipped to min/max"]
    assert png_levels(depth_to_png16(depth, lo, hi)).tolist() == [[0, 0], [65535, 65535]]


# ----------------------------------------------------------------------------------------------
# Images through the worker (RunPod SDK local mode)


def test_image_batch_decodes_to_the_models_output(
    worker, depth_weights: Path, reference: Reference
) -> None:
    wide = scene_image(320, 240, seed=1)
    tall = scene_image(180, 260, seed=2)
    run = worker(
        depth_job(
            images=[png_b64(wide), png_b64(tall), png_b64(wide)],
            options={"colormap": "turbo", "unused_knob": 1},
        ),
        PRELOAD_MODELS="depth-estimation",
    )
    assert run.returncode == 0, run.output[-3000:]
    assert "ready in" in run.output and "depth-anything-v2-small" in run.output
    result = run.result
    assert result is not None and "error" not in result, result
    assert result["model"] == "depth-anything-v2-small"
    assert result["encoding"]["value"] == "min + png / 65535 * (max - min)"
    assert "options.unused_knob is not used by depth-estimation" in result["warnings"]
    assert {"load_model", "inference", "encode"} <= set(result["timings_ms"])

    entries = result["results"]
    assert [e["index"] for e in entries] == [0, 1, 2]
    expected_maps = {"wide": reference.depth(wide), "tall": reference.depth(tall)}  # size 518
    for entry, key in zip(entries, ("wide", "tall", "wide"), strict=True):
        image = wide if key == "wide" else tall
        assert (entry["height"], entry["width"]) == image.shape[:2]
        lo, hi = entry["min"], entry["max"]
        data = artifact_bytes(entry["depth"])
        assert entry["depth"]["content_type"] == "image/png"
        levels = png_levels(data)
        assert levels.shape == image.shape[:2]
        assert levels.min() == 0 and levels.max() == 65535  # an image uses its own range
        decoded = png16_to_depth(data, lo, hi)
        expected = expected_maps[key]
        assert expected.std() > 1e-3 * abs(expected.mean())  # a map worth checking
        tol = tolerance(lo, hi)
        assert abs(lo - float(expected.min())) <= tol and abs(hi - float(expected.max())) <= tol
        assert np.abs(decoded - expected).max() <= tol
        # The preview is the same map through OpenCV's turbo colours (up to JPEG loss).
        preview = cv2.imdecode(np.frombuffer(artifact_bytes(entry["preview"]), np.uint8), 1)
        assert preview.shape == (*image.shape[:2], 3)

        # The random map is grainy, which JPEG smears: compare at a scale JPEG keeps.
        def smooth(bgr: np.ndarray) -> np.ndarray:
            return cv2.GaussianBlur(bgr, (0, 0), 2).astype(int)

        eight_bit = (levels >> 8).astype(np.uint8)
        turbo = cv2.applyColorMap(eight_bit, cv2.COLORMAP_TURBO)
        inferno = cv2.applyColorMap(eight_bit, cv2.COLORMAP_INFERNO)
        assert np.abs(smooth(preview) - smooth(turbo)).mean() < 5
        assert np.abs(smooth(preview) - smooth(inferno)).mean() > 20
    # The same image twice in a batch: the same bytes.
    assert entries[0]["depth"]["sha256"] == entries[2]["depth"]["sha256"]
    assert entries[0]["depth"]["sha256"] != entries[1]["depth"]["sha256"]


# ----------------------------------------------------------------------------------------------
# Video: one scale across the clip


def zip_members(archive: dict[str, Any]) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(artifact_bytes(archive))) as zipped:
        return {name: zipped.read(name) for name in zipped.namelist()}


def test_clip_frames_share_one_scale(worker, reference: Reference) -> None:
    first = scene_image(160, 120, seed=4)
    other = cv2.GaussianBlur(255 - scene_image(160, 120, seed=7), (0, 0), 3)  # another range
    third = scene_image(160, 120, seed=9)
    clip = [first, other, first, third]
    run = worker(
        depth_job(
            frames=[png_b64(f) for f in clip],
            fps=8,
            options={"input_size": SMALL_INPUT, "preview": True},
        )
    )
    assert run.returncode == 0, run.output[-3000:]
    result = run.result
    assert result is not None and "error" not in result, result
    assert result["video"]["sampled_frames"] == 4 and result["video"]["source"] == "frames"
    frames = result["frames"]
    assert [f["frame_index"] for f in frames] == [0, 1, 2, 3]
    assert [f["time_s"] for f in frames] == [0.0, 0.125, 0.25, 0.375]
    lo, hi = result["min"], result["max"]
    # The clip's range is exactly the union of the frames' ranges.
    assert lo == min(f["min"] for f in frames) and hi == max(f["max"] for f in frames)
    assert (result["width"], result["height"]) == (160, 120)

    members = zip_members(result["archive"])
    assert result["archive"]["content_type"] == "application/zip"
    manifest = json.loads(members["manifest.json"])
    assert manifest["min"] == lo and manifest["max"] == hi and manifest["frames"] == frames
    tol = tolerance(lo, hi)
    for entry, pixels in zip(frames, clip, strict=True):
        data = members[entry["png"]]
        # Decoded with the clip's min/max, each PNG is that frame's own model output...
        expected = reference.depth(pixels, SMALL_INPUT)
        assert np.abs(png16_to_depth(data, lo, hi) - expected).max() <= tol
        assert abs(entry["min"] - float(expected.min())) <= tol
        assert abs(entry["max"] - float(expected.max())) <= tol
        # ...and its levels sit where the clip's scale puts the frame's own range.
        levels = png_levels(data)
        assert abs(int(levels.min()) - round((entry["min"] - lo) / (hi - lo) * 65535)) <= 1
        assert abs(int(levels.max()) - round((entry["max"] - lo) / (hi - lo) * 65535)) <= 1
        preview = cv2.imdecode(np.frombuffer(members[entry["preview"]], np.uint8), 1)
        assert preview.shape == (120, 160, 3)
    # Not stretched per frame: some frame does not reach both ends of the 16-bit range.
    spans = [png_levels(members[f["png"]]) for f in frames]
    assert any(s.min() > 0 or s.max() < 65535 for s in spans)
    # The same frame repeated gives the same bytes; a different frame does not.
    assert members[frames[0]["png"]] == members[frames[2]["png"]]
    assert members[frames[0]["png"]] != members[frames[1]["png"]]


def test_mp4_window_max_side_and_frames_artifact(worker, tmp_path: Path) -> None:
    from scripts.synthetic_video import moving_shapes_clip
    from tests.splat_scene import encode_mp4

    clip = moving_shapes_clip(3, width=200, height=150, frame_count=12, fps=12.0, texture=30)
    video = encode_mp4(clip.frames, tmp_path / "clip.mp4", fps=12.0)
    out_dir = tmp_path / "out"
    run = worker(
        depth_job(
            video=base64.b64encode(video.read_bytes()).decode(),
            options={
                "fps": 6,
                "start_sec": 0.25,
                "end_sec": 0.9,
                "max_side": 100,
                "input_size": SMALL_INPUT,
            },
        ),
        OUTPUT_DIR=str(out_dir),
        FRAMES_INLINE_MAX_BYTES="64",  # the per-frame list goes out as frames.json
    )
    assert run.returncode == 0, run.output[-3000:]
    result = run.result
    assert result is not None and "error" not in result, result
    assert "frames" not in result and result["frames_count"] == result["video"]["sampled_frames"]
    frames = json.loads(artifact_bytes(result["frames_artifact"]))
    times = [f["time_s"] for f in frames]
    assert len(frames) == 4 and times == sorted(times)
    assert all(0.25 - 1e-6 <= t < 0.9 for t in times)
    assert [f["frame_index"] for f in frames] == [3, 5, 7, 9]  # 6 of the clip's 12 fps
    assert result["archive"]["storage"] == "local"
    assert Path(result["archive"]["path"]).is_relative_to(out_dir)
    members = zip_members(result["archive"])
    lo, hi = result["min"], result["max"]
    for entry in frames:
        decoded = png16_to_depth(members[entry["png"]], lo, hi)
        assert decoded.shape == (75, 100)  # 200x150 fitted into max_side 100
        # Each frame's own min/max are in its PNG, to quantisation.
        step = (hi - lo) / 65535
        assert abs(float(decoded.min()) - entry["min"]) <= step
        assert abs(float(decoded.max()) - entry["max"]) <= step
    assert not any(name.endswith(".jpg") for name in members)  # no preview unless asked


def test_real_footage_runs(worker) -> None:
    path = require_shared_media("sam2_01_dog_walk.mp4")
    run = worker(
        depth_job(
            video=base64.b64encode(path.read_bytes()).decode(),
            options={"fps": 2, "max_frames": 3, "max_side": 320, "input_size": SMALL_INPUT},
        )
    )
    assert run.returncode == 0, run.output[-3000:]
    result = run.result
    assert result is not None and "error" not in result, result
    assert result["video"]["width"] == 1280 and result["video"]["sampled_frames"] == 3
    assert (result["width"], result["height"]) == (320, 180)
    assert [f["frame_index"] for f in result["frames"]] == [0, 15, 30]  # 30 fps source
    members = zip_members(result["archive"])
    assert sorted(n for n in members if n.endswith(".png")) == [
        "frame_000000.png",
        "frame_000015.png",
        "frame_000030.png",
    ]


# ----------------------------------------------------------------------------------------------
# In one process: concurrency, bad inputs, missing models


def test_concurrent_jobs_share_the_model_safely(inprocess, depth_weights: Path) -> None:
    images = [png_b64(scene_image(96, 72, seed=s)) for s in (20, 21)]
    jobs = [depth_job(image=img, options={"input_size": 70}) for img in images]
    alone = [inprocess(job) for job in jobs]
    together: list[dict[str, Any]] = [{}, {}]

    def call(i: int) -> None:
        together[i] = inprocess(jobs[i], job_id=f"parallel-{i}")

    threads = [threading.Thread(target=call, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for a, b in zip(alone, together, strict=True):
        assert "error" not in b, b
        assert a["results"][0]["depth"]["sha256"] == b["results"][0]["depth"]["sha256"]


def test_studio_shape_image_and_video(inprocess, depth_weights: Path, tmp_path: Path) -> None:
    """The Studio's `payloadBase64` + `mimeType`, an image and then a video, in our own shape
    (`response_format: native`; tests/test_studio.py reads the Studio's)."""
    image = scene_image(96, 72, seed=30)
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    studio = {
        "task": "depth-estimation",
        "model": "depth-anything/Depth-Anything-V2-Small-hf",  # the hub id names the folder
        "payloadBase64": base64.b64encode(jpeg.tobytes()).decode(),
        "mimeType": "image/jpeg",
        "options": {"input_size": 70, "preview": True},
        "response_format": "native",
    }
    result = inprocess(studio)
    assert "error" not in result, result
    entry = result["results"][0]
    assert (entry["width"], entry["height"]) == (96, 72) and entry["max"] > entry["min"]
    assert png_levels(artifact_bytes(entry["depth"])).shape == (72, 96)
    assert entry["preview"]["content_type"] == "image/jpeg"

    video = make_video(tmp_path / "studio.mp4", frames=5, size=(64, 48)).read_bytes()
    clip = inprocess(
        {**studio, "payloadBase64": base64.b64encode(video).decode(), "mimeType": "video/mp4"}
    )
    assert "error" not in clip, clip
    assert [f["frame_index"] for f in clip["frames"]] == [0, 1, 2, 3, 4]
    members = zip_members(clip["archive"])
    assert all(f["png"] in members and f["preview"] in members for f in clip["frames"])


def bad_cases(tmp: Path) -> list[tuple[str, dict[str, Any], str, str]]:
    image = png_b64(scene_image(64, 48, seed=1))
    video_bytes = make_video(tmp / "clip.mp4", frames=6).read_bytes()
    video = base64.b64encode(video_bytes).decode()
    return [
        ("weights file", depth_job(image=image, model="yolo11n.pt"), "invalid_input", "folder"),
        (
            "unknown colormap",
            depth_job(image=image, options={"colormap": "rainbowz"}),
            "invalid_input",
            "options.colormap",
        ),
        (
            "input size too small",
            depth_job(image=image, options={"input_size": 4}),
            "invalid_input",
            "options.input_size",
        ),
        (
            "start after end",
            depth_job(video=video, options={"start_sec": 2, "end_sec": 1}),
            "invalid_input",
            "end_sec",
        ),
        (
            "no frames after trim",
            depth_job(video=video, options={"start_sec": 30}),
            "invalid_input",
            "no frames",
        ),
        (
            "zero-byte video",
            depth_job(video="data:video/mp4;base64,"),
            "media_decode_failed",
            "0 bytes",
        ),
        (
            "truncated mp4",
            depth_job(video=base64.b64encode(video_bytes[: len(video_bytes) // 3]).decode()),
            "media_decode_failed",
            "video",
        ),
        ("image as video", depth_job(video=image), "media_decode_failed", "not a video"),
        (
            "missing model",
            depth_job(image=image, model="depth-anything-v2-base"),
            "model_unavailable",
            "depth-anything-v2-base",
        ),
    ]


def test_bad_inputs_get_clear_codes(inprocess, depth_weights: Path, tmp_path: Path) -> None:
    for case, job, code, word in bad_cases(tmp_path):
        result = inprocess(job)
        assert result.get("error_code") == code, (case, result)
        assert word.lower() in result["error"].lower(), (case, result["error"])
    # The worker still answers a good request afterwards.
    good = inprocess(depth_job(image=png_b64(scene_image(64, 48)), options={"input_size": 70}))
    assert "error" not in good and good["results"][0]["width"] == 64


def test_missing_or_broken_model_folder(
    inprocess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-weights"
    (empty / "depth-anything-v2-small").mkdir(parents=True)  # a folder without the files
    monkeypatch.setenv("WEIGHTS_DIR", str(empty))
    inprocess.reset()
    job = depth_job(image=png_b64(scene_image(64, 48)))
    broken = inprocess(job)
    assert broken["error_code"] == "model_unavailable", broken
    assert "config.json" in broken["error"] and "save_pretrained" in broken["error"]

    (empty / "depth-anything-v2-small").rmdir()
    inprocess.reset()
    missing = inprocess(job)
    assert missing["error_code"] == "model_unavailable", missing
    assert str(empty / "depth-anything-v2-small") in missing["error"]
    assert "ALLOW_MODEL_DOWNLOADS=false" in missing["error"]
    # The hub id of the default model names the same folder.
    by_hub_id = inprocess({**job, "model": "depth-anything/Depth-Anything-V2-Small-hf"})
    assert str(empty / "depth-anything-v2-small") in by_hub_id["error"]
